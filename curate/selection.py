"""Selection strategies: which scored questions' answers become training data.

`DecayingThreshold` is the seed project's rule for SaGE-filtered data: walk the questions in order; keep a
question's answers when its SaGE score exceeds the threshold in force, then decay the threshold
(``threshold = max(min_threshold, threshold * decay_rate)``) after every question, kept or not. Early
questions must be very consistent to be taken; later ones need only reach the floor. A question whose
*target* model (the small model being aligned) is more consistent than the aligned teacher goes to a
feedback set instead: the teacher's answers would not teach it consistency there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class Decision:
    question_id: str
    score: float
    threshold: float  # the threshold in force when this question was considered
    selected: bool
    feedback: bool


@dataclass
class DecayingThreshold:
    """Keep score > threshold; threshold decays multiplicatively to a floor after each question."""

    initial_threshold: float = 0.9
    decay_rate: float = 0.99
    min_threshold: float = 0.6

    def __post_init__(self) -> None:
        if not 0 < self.decay_rate <= 1:
            raise ValueError(f"decay_rate must be in (0, 1], got {self.decay_rate}")
        if self.min_threshold > self.initial_threshold:
            raise ValueError("min_threshold must not exceed initial_threshold")

    def thresholds(self, n: int) -> list[float]:
        """The threshold in force at each of the first n questions."""
        out, t = [], self.initial_threshold
        for _ in range(n):
            out.append(t)
            t = max(self.min_threshold, t * self.decay_rate)
        return out

    def select(
        self,
        question_ids: Sequence[str],
        scores: Sequence[float],
        target_scores: Sequence[float] | None = None,
    ) -> list[Decision]:
        """One decision per question, in the given order. NaN scores are never selected."""
        if len(question_ids) != len(scores):
            raise ValueError("question_ids and scores differ in length")
        if target_scores is not None and len(target_scores) != len(scores):
            raise ValueError("target_scores and scores differ in length")
        decisions = []
        for i, (qid, score, t) in enumerate(zip(question_ids, scores, self.thresholds(len(scores)), strict=True)):
            target = None if target_scores is None else target_scores[i]
            feedback = target is not None and not math.isnan(target) and not math.isnan(score) and target > score
            decisions.append(Decision(qid, score, t, selected=(not math.isnan(score)) and score > t,
                                      feedback=feedback))
        return decisions


def usable(answer: str = "model_output", finish: str = "finish_reason", refusal: str = "refusal",
           rot_finish: str | None = "rot_finish_reason") -> pl.Expr:
    """Rows that may be scored or selected: a non-empty, unrefused answer that ended with ``stop`` (not cut by
    max_tokens, not filtered), with a complete RoT. A cut or refused answer must never become training data."""
    ok = (pl.col(answer) != "") & (pl.col(finish) == "stop") & pl.col(refusal).is_null()
    if rot_finish is not None:
        ok = ok & (pl.col(rot_finish) == "stop")
    return ok.fill_null(False)
