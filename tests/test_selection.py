"""The decaying-threshold rule, checked by hand on small sequences."""

from __future__ import annotations

import math

import pytest

from curate.selection import DecayingThreshold


def test_thresholds_decay_to_floor() -> None:
    s = DecayingThreshold(initial_threshold=0.8, decay_rate=0.5, min_threshold=0.3)
    assert s.thresholds(4) == [0.8, 0.4, 0.3, 0.3]


def test_select_uses_threshold_in_force() -> None:
    s = DecayingThreshold(initial_threshold=0.8, decay_rate=0.5, min_threshold=0.3)
    d = s.select(["a", "b", "c", "d"], [0.79, 0.5, 0.3, math.nan])
    assert [x.selected for x in d] == [False, True, False, False]  # strictly greater; NaN never
    assert [x.threshold for x in d] == [0.8, 0.4, 0.3, 0.3]


def test_feedback_when_target_more_consistent() -> None:
    s = DecayingThreshold(initial_threshold=0.5, decay_rate=1.0, min_threshold=0.5)
    d = s.select(["a", "b"], [0.7, 0.6], target_scores=[0.9, 0.1])
    assert [x.feedback for x in d] == [True, False]
    assert [x.selected for x in d] == [True, True]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="decay_rate"):
        DecayingThreshold(decay_rate=0)
    with pytest.raises(ValueError, match="min_threshold"):
        DecayingThreshold(initial_threshold=0.5, min_threshold=0.6)
    with pytest.raises(ValueError, match="differ"):
        DecayingThreshold().select(["a"], [0.1, 0.2])
