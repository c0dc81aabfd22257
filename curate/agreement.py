"""Agreement of an annotation task: Krippendorff's α (nominal, NA as missing) per question and per annotator pair,
with a bootstrap interval over items; for pair tasks, how well SaGE's similarity predicts the human majority."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

import krippendorff
import numpy as np

from curate.annotate import Judgments, Task

log = logging.getLogger(__name__)

CODES = {"Y": 1.0, "N": 0.0}  # NA (and no judgment) -> missing


def reliability_matrix(task: Task, judgments: Judgments, field: str,
                       annotators: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(annotators, [annotators × items] of 1 = Y, 0 = N, nan = NA or not judged), items in task order."""
    final = judgments.latest()
    names = annotators if annotators is not None else judgments.annotators()
    items = task.item_ids()
    m = np.full((len(names), len(items)), np.nan)
    for a, name in enumerate(names):
        for i, item in enumerate(items):
            rec = final.get((item, name, field))
            if rec is not None and rec["value"] in CODES:
                m[a, i] = CODES[rec["value"]]
    return names, m


def alpha(m: np.ndarray) -> float | None:
    """Nominal α, or None when it is undefined (fewer than two pairable values, or a single category)."""
    pairable = (~np.isnan(m)).sum(axis=0) >= 2
    if pairable.sum() == 0:
        return None
    values = m[:, pairable]
    if len(np.unique(values[~np.isnan(values)])) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=m[:, pairable], level_of_measurement="nominal",
                                    value_domain=[0.0, 1.0]))


def bootstrap_alpha(m: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of α over items resampled with replacement (resamples where α is undefined dropped)."""
    m = m[:, (~np.isnan(m)).sum(axis=0) >= 2]
    if m.shape[1] < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        a = alpha(m[:, rng.integers(0, m.shape[1], m.shape[1])])
        if a is not None:
            draws.append(a)
    if len(draws) < n // 10:
        return None
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _fmt(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 4)


def majority(m: np.ndarray) -> np.ndarray:
    """Per item: 1 when more annotators said Y than N, 0 for the reverse, nan on a tie or no Y/N answer."""
    yes = np.nansum(m == 1.0, axis=0)
    no = np.nansum(m == 0.0, axis=0)
    return np.where(yes > no, 1.0, np.where(no > yes, 0.0, np.nan))


def compute_agreement(task: Task, judgments: Judgments, *, bootstrap: int = 1000, seed: int = 0,
                      threshold: float | None = None, figure: Path | None = None) -> dict[str, Any]:
    """Everything `curate annotate agreement` reports, as plain data (JSON-ready)."""
    out: dict[str, Any] = {"task": task.name, "kind": task.kind, "items": len(task.items),
                           "annotators": judgments.annotators(), "fields": {}}
    for field in task.fields:
        names, m = reliability_matrix(task, judgments, field)
        ci = bootstrap_alpha(m, bootstrap, seed)
        entry: dict[str, Any] = {
            "alpha": _fmt(alpha(m)), "ci95": [round(ci[0], 4), round(ci[1], 4)] if ci else None,
            "judged_items": int(((~np.isnan(m)).sum(axis=0) >= 1).sum()),
            "pairable_items": int(((~np.isnan(m)).sum(axis=0) >= 2).sum()),
            "pairs": [],
        }
        for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
            sub = m[[i, j]]
            pci = bootstrap_alpha(sub, bootstrap, seed)
            entry["pairs"].append({"annotators": [a, b], "alpha": _fmt(alpha(sub)),
                                   "ci95": [round(pci[0], 4), round(pci[1], 4)] if pci else None,
                                   "items": int((~np.isnan(sub)).all(axis=0).sum())})
        out["fields"][field] = entry
    if task.kind == "pair":
        out["sage_vs_human"] = sage_vs_human(task, judgments, threshold, figure)
    return out


def sage_vs_human(task: Task, judgments: Judgments, threshold: float | None, figure: Path | None) -> dict[str, Any]:
    """ROC AUC of SaGE's pair similarity against the human majority (Y = same meaning), accuracy at a threshold."""
    from sklearn.metrics import roc_auc_score, roc_curve

    _, m = reliability_matrix(task, judgments, "same")
    maj = majority(m)
    sims = np.array([float(it["similarity"]) for it in task.items])
    keep = ~np.isnan(maj)
    y, s = maj[keep].astype(int), sims[keep]
    thr = float(threshold if threshold is not None else task.params.get("threshold", 0.6))
    res: dict[str, Any] = {"items_with_majority": int(keep.sum()), "threshold": thr,
                           "positives": int(y.sum()), "negatives": int((1 - y).sum())}
    res["accuracy"] = round(float(((s >= thr).astype(int) == y).mean()), 4) if len(y) else None
    both = len(set(y.tolist())) == 2
    res["roc_auc"] = round(float(roc_auc_score(y, s)), 4) if both else None
    if figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        for label, colour, name in ((1, "tab:green", "humans: same"), (0, "tab:red", "humans: different")):
            vals = s[y == label]
            ax1.scatter(vals, np.full(len(vals), label) + np.linspace(-0.15, 0.15, len(vals)), c=colour,
                        label=name, alpha=0.7)
        ax1.axvline(thr, color="grey", ls="--", label=f"threshold {thr:g}")
        ax1.set_yticks([0, 1], ["different", "same"])
        ax1.set_xlabel("SaGE pair similarity")
        ax1.legend(fontsize=7)
        if both:
            fpr, tpr, _ = roc_curve(y, s)
            ax2.plot(fpr, tpr, marker="o")
        ax2.plot([0, 1], [0, 1], color="grey", ls=":")
        ax2.set_xlabel("false positive rate")
        ax2.set_ylabel("true positive rate")
        ax2.set_title(f"ROC AUC {res['roc_auc']}" if both else "ROC: needs both majorities")
        fig.suptitle(f"SaGE similarity vs human majority ({task.name})")
        fig.tight_layout()
        figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(figure, dpi=90)
        plt.close(fig)
        res["figure"] = str(figure)
    return res
