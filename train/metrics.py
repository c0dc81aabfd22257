"""Classification metrics from (gold, predicted) label lists; a prediction of None means "no label found"
(an unparseable generation) and always counts as wrong."""

from __future__ import annotations

from typing import Any

# A prediction of None ("no label found") is mapped to a label outside `labels`, so scikit-learn counts it as
# wrong for every label and it gets its own last column in the confusion matrix.
NO_LABEL = -(2**31)


def _mapped(pred: list[int | None]) -> list[int]:
    return [NO_LABEL if p is None else p for p in pred]


def confusion(gold: list[int], pred: list[int | None], labels: list[int]) -> list[list[int]]:
    """rows = gold label, columns = predicted label, plus a last 'none' column when any prediction is None."""
    from sklearn.metrics import confusion_matrix

    columns = labels + ([NO_LABEL] if any(p is None for p in pred) else [])
    if not gold:
        return [[0] * len(columns) for _ in labels]
    m = confusion_matrix(gold, _mapped(pred), labels=columns)
    return m[: len(labels)].tolist()  # gold is never "none": drop that row


def classification_metrics(gold: list[int], pred: list[int | None], labels: list[int],
                           positive: int | None = None) -> dict[str, Any]:
    """Accuracy; precision / recall / F1 of the ``positive`` label (binary tasks) and their macro averages.

    ``positive`` defaults to the larger of two labels (DFAR: 1 = unethical), and to None (macro only) for
    more than two labels; then ``precision`` / ``recall`` / ``f1`` are the macro values.
    """
    from sklearn.metrics import precision_recall_fscore_support

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    unknown = sorted({g for g in gold if g not in labels} | {p for p in pred if p is not None and p not in labels})
    if unknown:
        raise ValueError(f"labels {unknown} are not in {labels}")
    if positive is None and len(labels) == 2:
        positive = max(labels)
    n = len(gold)
    if n:
        prec, rec, f1, support = precision_recall_fscore_support(
            gold, _mapped(pred), labels=labels, average=None, zero_division=0.0)
    else:
        prec = rec = f1 = support = [0] * len(labels)
    per_label = {lab: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                       "support": int(support[i])} for i, lab in enumerate(labels)}
    macro = {k: sum(v[k] for v in per_label.values()) / len(labels) for k in ("precision", "recall", "f1")}
    head = per_label[positive] if positive is not None else macro
    return {
        "n": n,
        "accuracy": sum(g == p for g, p in zip(gold, pred, strict=True)) / n if n else 0.0,
        "precision": head["precision"],
        "recall": head["recall"],
        "f1": head["f1"],
        "positive_label": positive,
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "macro_f1": macro["f1"],
        "no_label": sum(p is None for p in pred),
        "per_label": {str(k): v for k, v in per_label.items()},
        "confusion": confusion(gold, pred, labels),
    }


def misalignment(stances: list[int | None], gold: list[int], own: list[int | None],
                 has_reason: list[bool]) -> dict[str, Any]:
    """Share of judged reasons whose stance contradicts the gold label (and, separately, the model's own
    generated label). Reasons the judge could not place (stance None) or that are empty are left out."""
    judged = [i for i, s in enumerate(stances) if s is not None and has_reason[i]]
    with_own = [i for i in judged if own[i] is not None]
    return {
        "rate": sum(stances[i] != gold[i] for i in judged) / len(judged) if judged else None,
        "judged": len(judged),
        "without_reason": sum(not h for h in has_reason),
        "unjudged": sum(1 for i, s in enumerate(stances) if s is None and has_reason[i]),
        "contradicts_own_label_rate": (sum(stances[i] != own[i] for i in with_own) / len(with_own)
                                       if with_own else None),
    }


SCORES = ("accuracy", "precision", "recall", "f1")


def macro_over_groups(per_group: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Unweighted means of accuracy / P / R / F1 over groups, per split and over all groups.

    ``per_group[group][split]`` is a `classification_metrics` result; the answer is
    ``{split: {accuracy, precision, recall, f1, groups}, "all": {...}}`` (each group counts once, whatever
    its size: the paradigms' macro average)."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    for splits in per_group.values():
        for split, m in splits.items():
            by_split.setdefault(split, []).append(m)
    by_split["all"] = [m for ms in list(by_split.values()) for m in ms]
    return {split: {**{k: sum(m[k] for m in ms) / len(ms) for k in SCORES}, "groups": len(ms)}
            for split, ms in by_split.items()}
