"""Shared fixtures: the real data beside the repo, and a fresh store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CURATE_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a real hub by accident
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test (with the reason) when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data {p} is not present (expected ../shared/data beside the repo)")
    return p


@pytest.fixture
def dfar_source() -> Path:
    return shared("dfar")


@pytest.fixture
def ethics_source() -> Path:
    return shared("ethics")


@pytest.fixture
def store(tmp_path: Path):
    from curate.store import DatasetStore

    return DatasetStore(tmp_path / "store")


@pytest.fixture(scope="session")
def built_dfar(tmp_path_factory: pytest.TempPathFactory):
    """One DFAR build shared by read-only tests (building takes under a second, but reading is shared)."""
    from builders.dfar import build_dfar
    from curate.store import DatasetStore

    st = DatasetStore(tmp_path_factory.mktemp("dfar-store"))
    return build_dfar(st, shared("dfar")).version, st
