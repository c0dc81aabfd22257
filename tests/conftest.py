"""Shared fixtures: the real data beside the repo, and a fresh store per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CURATE_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a real hub by accident
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# A skip is allowed only for these markers; any other skip (missing data, a missing package) is a failure, so a
# run cannot go green without the tests that matter.
ALLOWED_SKIP_MARKERS = ("hub", "optin")


def shared(*parts: str) -> Path:
    """A path under ../shared/data; the test fails loudly (never skips) when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"real data {p} is not present (expected ../shared/data beside the repo)", pytrace=False)
    return p


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """Turn a skip into a failure unless the test is the real-Hub smoke test or explicitly opt-in."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        if not any(item.get_closest_marker(m) for m in ALLOWED_SKIP_MARKERS):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            report.outcome = "failed"
            report.longrepr = f"skipped, but only tests marked {ALLOWED_SKIP_MARKERS} may skip: {reason}"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures(...)`)."""
    from tests.tiny import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="module")
def tok() -> Any:
    """The real SmolLM2 tokenizer (from the installed GGUF), shared by a module's tiny-model tests."""
    from tests.tiny import smollm2_tokenizer

    return smollm2_tokenizer()


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
