"""The SaGE selection figure: threshold and per-question score over the question order, and a histogram."""

from __future__ import annotations

import io
import math

import polars as pl


def selection_figure(scores: list[float], decisions: pl.DataFrame) -> bytes:
    """PNG bytes: left, score per question (selected ones filled) under the decaying threshold; right,
    the distribution of scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(range(len(scores)))
    selected = decisions["selected"].to_list()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    ax1.plot(order, decisions["threshold"].to_list(), color="tab:red", label="threshold in force")
    ax1.scatter([o for o, s in zip(order, selected, strict=True) if s],
                [v for v, s in zip(scores, selected, strict=True) if s], s=14, color="tab:blue", label="selected")
    ax1.scatter([o for o, s in zip(order, selected, strict=True) if not s],
                [v for v, s in zip(scores, selected, strict=True) if not s], s=14, facecolors="none",
                edgecolors="tab:gray", label="not selected")
    ax1.set(xlabel="question (order of selection)", ylabel="SaGE score", title="Decaying-threshold selection")
    ax1.legend(loc="lower right", fontsize=8)
    finite = [v for v in scores if not math.isnan(v)]
    ax2.hist(finite, bins=20, color="tab:blue", alpha=0.8)
    ax2.set(xlabel="SaGE score", ylabel="questions", title=f"Scores (n={len(finite)})")
    fig.tight_layout()
    buf = io.BytesIO()
    # no Software tag: the PNG bytes do not change with the matplotlib version
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
