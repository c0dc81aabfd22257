"""The store's promises: atomic versions, stable content hashes, no-op rebuilds, tag resolution."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from curate.errors import CurateError
from curate.store import DatasetStore, SourceFile, content_hash


def _write(store: DatasetStore, rows: list[int], name: str = "toy"):
    with store.new_version(name, builder="toy", builder_version="0", params={"rows": rows},
                           sources=[SourceFile("mem://toy", "0" * 64, 0)]) as w:
        w.write_table("default", "train", pa.table({"x": pa.array(rows, pa.int64())}))
    return w.result


def test_version_is_complete_and_tagged(store: DatasetStore) -> None:
    r = _write(store, [1, 2, 3])
    assert r.created and r.version.tag == "v1"
    v = store.get("toy")
    assert v.hash == r.version.hash == content_hash(v.path)
    m = json.loads((v.path / "manifest.json").read_text())
    assert m["configs"]["default"]["train"]["num_rows"] == 3
    assert m["schema"]["default"] == {"x": "int64"}
    assert m["builder"] == {"name": "toy", "version": "0"}
    assert m["toolkit"]["package"] == "ethics-curate"
    assert (v.path / "README.md").read_text().startswith("---\n")
    assert v.read("default")["x"].to_pylist() == [1, 2, 3]


def test_identical_rebuild_is_a_noop(store: DatasetStore) -> None:
    first = _write(store, [1, 2, 3])
    again = _write(store, [1, 2, 3])
    assert not again.created and again.version.tag == first.version.tag
    assert [v.tag for v in store.versions("toy")] == ["v1"]
    second = _write(store, [4])
    assert second.created and second.version.tag == "v2"
    assert store.get("toy").tag == "v2"


def test_hash_is_stable_across_stores(tmp_path) -> None:
    a = _write(DatasetStore(tmp_path / "a"), [5, 6]).version
    b = _write(DatasetStore(tmp_path / "b"), [5, 6]).version
    assert a.hash == b.hash
    for fa in a.files("default"):
        assert fa.read_bytes() == (b.path / fa.relative_to(a.path)).read_bytes()


def test_failed_build_leaves_store_untouched(store: DatasetStore) -> None:
    _write(store, [1])
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    with pytest.raises(RuntimeError):
        with store.new_version("toy", builder="toy", builder_version="0", params={}, sources=[]) as w:
            w.write_table("default", "train", pa.table({"x": [9, 9]}))
            raise RuntimeError("crash midway")
    after = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    assert before == after
    assert [v.tag for v in store.versions("toy")] == ["v1"]


def test_resolve_refs(store: DatasetStore) -> None:
    v1 = _write(store, [1]).version
    v2 = _write(store, [2]).version
    assert store.get("toy@v1") == v1
    assert store.get("toy", "latest") == v2
    assert store.get(f"toy@{v1.hash[:8]}") == v1
    with pytest.raises(CurateError, match="no version 'v9'"):
        store.get("toy@v9")
    with pytest.raises(CurateError, match="no dataset named 'nope'"):
        store.get("nope")


def test_bad_names_refused(store: DatasetStore) -> None:
    with pytest.raises(CurateError, match="dataset name"):
        _write(store, [1], name="Bad Name")


def test_import_version_verifies_hash(store: DatasetStore, tmp_path) -> None:
    src = _write(DatasetStore(tmp_path / "other"), [7, 8]).version
    with pytest.raises(CurateError, match="content hash mismatch"):
        store.import_version("toy", src.path, "f" * 64)
    assert store.names() == []
    r = store.import_version("toy", src.path, src.hash)
    assert r.created and r.version.hash == src.hash
    assert store.import_version("toy", src.path, src.hash).created is False


def test_atomic_helpers_leave_old_or_new(tmp_path) -> None:
    from curate.atomic import atomic_path, atomic_place_dir, atomic_write_json, atomic_write_text

    dest = tmp_path / "a.json"
    atomic_write_json(dest, {"k": "é"})
    assert json.loads(dest.read_text(encoding="utf-8")) == {"k": "é"}
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert json.loads(dest.read_text(encoding="utf-8")) == {"k": "é"}  # untouched, temp gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    atomic_write_text(dest, "new")
    assert dest.read_text() == "new"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    atomic_place_dir(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "f").read_text() == "x" and not src.exists()
    (tmp_path / "src2").mkdir()
    with pytest.raises(FileExistsError):
        atomic_place_dir(tmp_path / "src2", tmp_path / "dst")
