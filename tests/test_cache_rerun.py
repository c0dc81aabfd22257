"""An identical `curate cache-logits` rerun answers "unchanged" from the stored version without loading the
teacher or computing a unit; anything that could change the result (damaged data, other teacher files, another
file split, a model object passed in) still goes the full way, which repairs a damaged identical version.

The teacher is a tiny random Llama saved as a folder on the real SmolLM2 tokenizer; "not loaded" is checked
with a spy in place of the loader the builder calls.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import builders.teacher_logits as tl
from builders.dfar import DfarConfig, build_dfar
from builders.teacher_logits import BuildResult, LogitCacheConfig, cache_teacher_logits
from curate.cli import app
from curate.models import ModelRef, load_causal_lm
from curate.store import DatasetStore
from tests.conftest import shared
from tests.tiny import save_tiny, smollm2_tokenizer

ROWS = 3  # per split of dfar lr; only the test split is cached


class TeacherLoaded(Exception):
    """Raised by the spy standing in for the model loader."""


@pytest.fixture(scope="module")
def dfar_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rerun-store")
    build_dfar(DatasetStore(root), shared("dfar"), DfarConfig(limit=ROWS))
    return root


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("rerun-teacher"), smollm2_tokenizer(), hidden=16, heads=2,
                     initializer_range=1.0)


def _store(tmp_path: Path, dfar_store: Path) -> DatasetStore:
    shutil.copytree(dfar_store, tmp_path / "store")
    return DatasetStore(tmp_path / "store")


def _spy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the teacher or computing a unit now fails loudly."""
    def refuse(*_: Any, **__: Any) -> Any:
        raise TeacherLoaded

    monkeypatch.setattr(tl, "load_causal_lm", refuse)
    monkeypatch.setattr(tl, "compute_units", refuse)


def _params(folder: Path, **kw: Any) -> LogitCacheConfig:
    return LogitCacheConfig(model=str(folder), dtype="float32", device="cpu", splits=["test"], k=8, chunk_size=2,
                            batch_size=2, **kw)


def test_identical_cli_rerun_is_unchanged_without_the_teacher(tmp_path: Path, dfar_store: Path, teacher_folder: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path, dfar_store)
    args = ["cache-logits", "--store", str(store.root), "--teacher", str(teacher_folder), "--dtype", "float32",
            "--device", "cpu", "--split", "test", "--k", "8", "--chunk-size", "2", "--batch-size", "2"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "built dfar-lr-logits@v1" in out.output
    v1 = store.get("dfar-lr-logits")
    key = v1.manifest["params"]["rerun_key"]
    assert isinstance(key, str) and len(key) == 16

    _spy(monkeypatch)
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "unchanged, already stored as dfar-lr-logits@v1" in out.output
    assert not list(store.root.glob("work/*/*/plan.json"))  # not even a work dir was started

    # a damaged data file: no short cut (the spy is reached), and the full path repairs it as before
    data = v1.files("default")[0]
    data.write_bytes(data.read_bytes()[:-64] + bytes(64))
    with pytest.raises(TeacherLoaded):
        cache_teacher_logits(store, _params(teacher_folder), progress=False)
    monkeypatch.undo()
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "repaired dfar-lr-logits@v1" in out.output
    assert store.verify(store.get("dfar-lr-logits")) == []

    _spy(monkeypatch)  # repaired, it is the identical version again
    again = cache_teacher_logits(store, _params(teacher_folder), progress=False)
    assert isinstance(again, BuildResult) and not again.created and not again.repaired
    assert (again.version.tag, again.version.hash) == ("v1", v1.hash)


def test_other_teacher_files_split_or_passed_model_compute(tmp_path: Path, dfar_store: Path, teacher_folder: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path, dfar_store)
    folder = tmp_path / "teacher"
    shutil.copytree(teacher_folder, folder)
    first = cache_teacher_logits(store, _params(folder), progress=False)
    assert isinstance(first, BuildResult) and first.created

    _spy(monkeypatch)
    with pytest.raises(TeacherLoaded):  # another file split is another version's bytes
        cache_teacher_logits(store, _params(folder, rows_per_file=1), progress=False)
    weights = next(folder.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # retrained in place, same name
    with pytest.raises(TeacherLoaded):
        cache_teacher_logits(store, _params(folder), progress=False)

    # a model object passed in is not vouched for by the files: computed, and its version records no key
    monkeypatch.undo()
    model = load_causal_lm(ModelRef.parse(str(folder)), dtype="float32", device="cpu").eval()
    passed = cache_teacher_logits(store, _params(folder, name="passed-logits"), model=model, progress=False)
    assert isinstance(passed, BuildResult) and passed.created
    assert passed.version.hash == first.version.hash and passed.version.manifest["params"]["rerun_key"] is None
    _spy(monkeypatch)
    with pytest.raises(TeacherLoaded):
        cache_teacher_logits(store, _params(folder, name="passed-logits"), progress=False)
