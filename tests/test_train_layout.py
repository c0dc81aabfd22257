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


def test_train_bench_documents_no_flag_it_does_not_honour() -> None:
    """`--gpu` was documented and parsed but did nothing; it is gone from the script and the README."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_bench.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--rows" in out and "--gpu" not in out
    assert "train_bench.py --gpu" not in (REPO / "README.md").read_text()
