"""PNG figures for a run: training / eval loss curves and confusion matrices (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEYS = ("loss", "ce", "kd")


def plot_losses(log_history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Train loss (and its CE / KD parts when logged) and eval loss against the optimizer step."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for rec in log_history:
        step = rec.get("step")
        if step is None:
            continue
        for key in (*LOSS_KEYS, "eval_loss"):
            if key in rec:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(float(rec[key]))
    if not series:
        return None
    names = {"loss": "train loss", "ce": "train CE", "kd": "train KD (T²·D)", "eval_loss": "eval loss"}
    return step_plot({names.get(k, k): (xs, ys, "o-" if k == "eval_loss" else "-") for k, (xs, ys) in series.items()},
                     path, ylabel="loss (nats)", title=title or "training curves")


def step_plot(series: dict[str, tuple[list[int], list[float], str]], path: Path, *, ylabel: str, title: str,
              zero_line: bool = False) -> Path:
    """Named (steps, values, style) lines against the optimizer step, saved as one PNG."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys, style) in series.items():
        ax.plot(xs, ys, style, label=label, markersize=3)
    if zero_line:
        ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig: Any, path: Path, dpi: int = 120, title: str = "") -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _confusion_panel(ax: Any, name: str, m: list[list[int]], words: list[str], fontsize: int | None = None) -> None:
    """Rows gold, columns predicted (plus 'none' when a generation named no label), counts in the cells."""
    small = {"fontsize": fontsize} if fontsize else {}
    cols = words + (["none"] if len(m[0]) > len(words) else [])
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, **small)
    ax.set_yticks(range(len(words)), words, **small)
    ax.set_xlabel("predicted", **small)
    ax.set_ylabel("gold", **small)
    ax.set_title(name, fontsize=fontsize + 1 if fontsize else None)
    peak = max(max(r) for r in m) or 1
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black", **small)


def plot_confusion(matrices: dict[str, list[list[int]]], labels: list[str], path: Path, title: str = "") -> Path:
    """One panel per reading (verbalizer scoring, parsed generation); rows gold, columns predicted.
    A generation that names no label is counted in an extra 'none' column."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items(), strict=True):
        _confusion_panel(ax, name, m, labels)
    return _save(fig, path, title=title)


def plot_group_confusion(matrices: dict[str, list[list[int]]], labels: dict[str, list[str]], path: Path,
                         title: str = "") -> Path:
    """One panel per group (ETHICS: paradigm × split), each with its own label words; rows gold, columns
    predicted; up to four panels a row."""
    n = len(matrices)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, matrices.items(), strict=False):
        _confusion_panel(ax, name, m, labels[name], fontsize=8)
    return _save(fig, path, dpi=110, title=title)
