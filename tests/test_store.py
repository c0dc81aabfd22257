"""The store's promises: atomic versions, stable content hashes, no-op rebuilds, tag resolution."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
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


# ---- the content hash is over the data, not the parquet bytes ------------------------------------------
def _mixed_table() -> pa.Table:
    """Nulls in every kind of column: parquet readers leave arbitrary bytes under null slots."""
    n = 5000
    return pa.table({
        "i": pa.array([None if k % 3 == 0 else k * 7919 for k in range(n)], pa.int64()),
        "f": pa.array([None if k % 4 == 0 else k / 7 for k in range(n)], pa.float64()),
        "s": pa.array([None if k % 5 == 0 else f"row {k}" * (k % 3) for k in range(n)], pa.string()),
        "b": pa.array([None if k % 6 == 0 else bool(k % 2) for k in range(n)], pa.bool_()),
        "l": pa.array([None if k % 7 == 0 else [k, None, -k][: k % 4] for k in range(n)], pa.list_(pa.int32())),
        "st": pa.array([None if k % 8 == 0 else {"a": k, "t": str(k)} for k in range(n)],
                       pa.struct([("a", pa.int16()), ("t", pa.string())])),
    })


def test_hash_ignores_parquet_layout_and_writer(tmp_path) -> None:
    from curate.store import HASH_SCHEME, LEGACY_SCHEME, arrow_digest

    t = _mixed_table()
    layouts = {"a": dict(compression="zstd", row_group_size=700), "b": dict(compression="snappy"),
               "c": dict(compression="none", use_dictionary=False, data_page_size=1024)}
    for name, opts in layouts.items():
        (tmp_path / name / "default").mkdir(parents=True)
        pq.write_table(t, tmp_path / name / "default" / "train-00000-of-00001.parquet", **opts)
    raw = {n: content_hash(tmp_path / n, LEGACY_SCHEME) for n in layouts}
    assert len(set(raw.values())) == 3  # the bytes differ...
    canon = {n: content_hash(tmp_path / n, HASH_SCHEME) for n in layouts}
    assert len(set(canon.values())) == 1  # ...the data does not
    f = tmp_path / "a" / "default" / "train-00000-of-00001.parquet"
    assert arrow_digest(f) == arrow_digest(f) == arrow_digest(f, batch_rows=333) == arrow_digest(f, batch_rows=1)
    # Any change to the data changes it: one value, a null turned into 0, a column renamed.
    for changed in (t.set_column(0, "i", pa.array([1] + t["i"].to_pylist()[1:], pa.int64())),
                    t.set_column(0, "i", pc.fill_null(t["i"], 0)),
                    t.rename_columns(["j", "f", "s", "b", "l", "st"])):
        pq.write_table(changed, tmp_path / "x.parquet")
        assert arrow_digest(tmp_path / "x.parquet") != arrow_digest(f)


def test_manifest_records_scheme_and_every_file(store: DatasetStore) -> None:
    from curate.store import HASH_SCHEME, arrow_digest

    with store.new_version("toy", builder="toy", builder_version="0", params={"a": 1},
                           sources=[SourceFile("mem://toy", "0" * 64, 0)]) as w:
        assert w.result is None and "result" in type(w).__annotations__
        w.write_table("default", "train", pa.table({"x": [1, 2]}))
        w.add_file("figures/plot.txt", b"a plot")
        w.add_params({"bytes": 123})  # known only after writing
    v = w.result.version
    m = json.loads((v.path / "manifest.json").read_text())
    assert m["hash_scheme"] == HASH_SCHEME
    assert m["params"] == {"a": 1, "bytes": 123}
    rel = "default/train-00000-of-00001.parquet"
    digest = arrow_digest(v.path / rel)
    assert m["data_files"] == {rel: digest}
    assert m["content_hash"] == hashlib.sha256(f"{rel}\0{digest}\n".encode()).hexdigest() == v.hash
    assert m["extra_files"] == {"figures/plot.txt": hashlib.sha256(b"a plot").hexdigest()}
    assert set(m["metadata_files"]) == {"README.md", "manifest.json"}
    assert store.verify(v) == []
    with pytest.raises(CurateError, match="not allowed"):
        with store.new_version("toy", builder="toy", builder_version="0", params={}, sources=[]) as w:
            w.add_file("../escape.txt", b"x")


def test_unregistered_file_in_a_build_is_refused(store: DatasetStore) -> None:
    with pytest.raises(CurateError, match="notes.txt.*without registering"):
        with store.new_version("toy", builder="toy", builder_version="0", params={}, sources=[]) as w:
            w.write_table("default", "train", pa.table({"x": [1]}))
            (w.tmp / "notes.txt").write_text("sneaked in")
    assert store.names() == []


def _make_legacy(store: DatasetStore, v) -> str:
    """Rewrite a version the way the store wrote them before `hash_scheme`: hash over the parquet bytes."""
    files = sorted(p.relative_to(v.path).as_posix() for p in v.path.rglob("*.parquet"))
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel}\0{hashlib.sha256((v.path / rel).read_bytes()).hexdigest()}\n".encode())
    legacy = h.hexdigest()
    m = json.loads((v.path / "manifest.json").read_text())
    for key in ("hash_scheme", "data_files", "extra_files", "metadata_files"):
        m.pop(key)
    m["content_hash"] = legacy
    (v.path / "manifest.json").write_text(json.dumps(m, indent=2))
    v.path.rename(v.path.parent / legacy[:16])
    (store.root / "datasets" / v.name / "tags.json").write_text(json.dumps({v.tag: legacy[:16]}))
    return legacy


def test_old_manifests_verify_with_file_sha256(store: DatasetStore) -> None:
    legacy = _make_legacy(store, _write(store, [1, 2, 3]).version)
    v = store.get("toy@v1")
    assert v.hash == legacy and "hash_scheme" not in v.manifest
    assert store.verify(v) == [] and content_hash(v.path) == legacy
    again = _write(store, [1, 2, 3])  # identical rows, byte-identical parquet: still the old version
    assert not again.created and again.version.hash == legacy
    assert [x.tag for x in store.versions("toy")] == ["v1"]
    f = v.files("default")[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    problems = store.verify(v)
    assert len(problems) == 1 and str(v.path) in problems[0] and "file-sha256" in problems[0]


def test_canonical_form_is_the_documented_byte_stream(tmp_path) -> None:
    """arrow-canonical-v1 spelled out by hand for a tiny table: any change here needs a new `hash_scheme`.

    Per column, one sha256 per component stream (null positions, values / string lengths and bytes), listed
    with the column's element count; so batches, row groups and pages cannot change it.
    """
    import struct

    from curate.store import arrow_digest

    pq.write_table(pa.table({"x": pa.array([1, None, 3], pa.int64()), "s": ["a", None, "ccc"]}),
                   tmp_path / "t.parquet", compression="snappy", row_group_size=1)

    def sha(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()

    streams = [  # (key, element count, stream bytes), sorted by key
        ("0", 3, None), ("0/nulls", None, struct.pack("<q", 1)), ("0/values", None, struct.pack("<3q", 1, 0, 3)),
        ("1", 3, None), ("1/bytes", None, b"accc"), ("1/lengths", None, struct.pack("<3q", 1, 0, 3)),
        ("1/nulls", None, struct.pack("<q", 1)),
    ]
    h = hashlib.sha256(b"arrow-canonical-v1\n3\n" + b"x\0int64\0True\n" + b"s\0string\0True\n")
    for key, count, data in streams:
        h.update(f"{key}\0{'' if count is None else count}\0{'' if data is None else sha(data)}\n".encode())
    assert arrow_digest(tmp_path / "t.parquet") == h.hexdigest()
    assert arrow_digest(tmp_path / "t.parquet", batch_rows=2) == h.hexdigest()
