"""Test fixtures stay out of the shipped packages: tiny random models live in tests/, not in train/."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_model_fixtures_are_not_part_of_the_product() -> None:
    assert importlib.util.find_spec("train.tiny") is None
    assert importlib.util.find_spec("tests.tiny") is not None
    product = [p for pkg in ("curate", "builders", "train") for p in (REPO / pkg).rglob("*.py")]
    importing = [str(p.relative_to(REPO)) for p in product
                 if re.search(r"^\s*(from|import)\s+tests\b", p.read_text(), re.MULTILINE)]
    assert importing == []
