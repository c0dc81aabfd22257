"""Digests taken from the rows as they are written equal a re-read of the files (`arrow_digest`), so a commit
need not read its files back; a file changed after it was written is re-read; stored hashes do not move."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders.base import ParquetSink
from curate.errors import CurateError
from curate.store import DatasetStore, arrow_digest, content_hash

# The DFAR build of ../shared/data/dfar as first stored under arrow-canonical-v1 (builder 1.1.0): a stored
# contract, computed before the commit stopped reading files back. It must never change.
DFAR_HASH = "eacc6153f31883040654c22ab6bca651688b5d43c4cb070a7276746aeaf1d3c4"


CHANGED_BY_PARQUET = ["l", "day", "ts"]  # read back as list<element>, date32, timestamp[ms]


def _varied(n: int = 1_000) -> pa.Table:
    """Nulls, slices, nested, dictionary and the types parquet stores differently from Arrow."""
    t = pa.table({
        "i": pa.array([None if k % 11 == 0 else k * 7 for k in range(n)], pa.int64()),
        "s": pa.array([None if k % 5 == 0 else "é" * (k % 4) + str(k) for k in range(n)], pa.string()),
        "ls": pa.array([f"large {k}" for k in range(n)], pa.large_string()),
        "b": pa.array([None if k % 6 == 0 else bool(k % 2) for k in range(n)], pa.bool_()),
        "f": pa.array([k / 3 for k in range(n)], pa.float32()),
        "l": pa.array([None if k % 7 == 0 else [k, None, -k][: k % 4] for k in range(n)], pa.list_(pa.int32())),
        "st": pa.array([None if k % 8 == 0 else {"a": k % 100, "t": str(k)} for k in range(n)],
                       pa.struct([("a", pa.int16()), ("t", pa.string())])),
        "d": pa.array([f"cat{k % 3}" for k in range(n)]).dictionary_encode(),
        "day": pa.array([dt.date(2020, 1, 1) + dt.timedelta(days=k) for k in range(n)], pa.date64()),
        "ts": pa.array([k * 1_000 for k in range(n)], pa.timestamp("s")),
    })
    return t.slice(3, n - 5)  # offsets into every buffer


def _rereads(version) -> dict[str, str]:
    """The independent computation: every stored file decoded again."""
    return {rel: arrow_digest(version.path / rel) for rel in version.manifest["data_files"]}


def test_write_table_digests_equal_a_reread(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    with store.new_version("w", builder="t", builder_version="0", params={}, sources=[]) as w:
        w.write_table("default", "train", _varied(), rows_per_shard=300)
        w.write_table("default", "test", _varied(0))  # empty: one file with no rows
        w.write_table("plain", "test", _varied().drop_columns(CHANGED_BY_PARQUET).slice(0, 0))
        w.write_table("chunked", "train", pa.concat_tables([_varied(50), _varied(70)]))
        w.write_table("plain", "train", _varied().drop_columns(CHANGED_BY_PARQUET))
        trusted = {p.relative_to(w.tmp).as_posix() for p, d in w.written.items() if d.matches(p)}
    assert len(w.written) == 8
    # Types parquet reads back differently are read back at commit; the rest never are.
    assert trusted == {"plain/train-00000-of-00001.parquet", "plain/test-00000-of-00001.parquet"}
    v = w.result.version
    assert v.manifest["data_files"] == _rereads(v)
    assert v.hash == content_hash(v.path)


def _sink_build(store: DatasetStore, sizes: tuple[int, ...] = (7, 0, 13, 1, 29, 25)):
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with store.new_version("s", builder="t", builder_version="0", params={}, sources=[]) as w:
        sink = ParquetSink(w, "default", "train", schema, row_group_rows=10, shard_rows=30)
        start = 0
        for n in sizes:
            sink.write(pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                                 "text": [None if k % 4 == 0 else f"row {k}" for k in range(start, start + n)]}))
            start += n
        sink.close()
        empty = ParquetSink(w, "default", "test", schema)
        empty.close()
        file_sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in w.written}
        assert {p: d.sha256 for p, d in w.written.items()} == file_sha and len(file_sha) == 4
    return w.result


def test_sink_digests_equal_a_reread(tmp_path: Path) -> None:
    v = _sink_build(DatasetStore(tmp_path)).version
    assert len(v.files("default", "train")) == 3
    assert v.manifest["data_files"] == _rereads(v)


def test_sink_file_sha256_finds_an_old_scheme_version(tmp_path: Path) -> None:
    """The file-sha256 a sink takes is what finds a version stored under the old scheme on an identical rebuild."""
    from tests.test_store import _make_legacy

    store = DatasetStore(tmp_path)
    legacy = _make_legacy(store, _sink_build(store).version)
    again = _sink_build(store, (75,))
    assert not again.created and again.version.hash == legacy


def test_a_file_changed_after_writing_is_read_back(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "a")
    with store.new_version("w", builder="t", builder_version="0", params={}, sources=[]) as w:
        w.write_table("default", "train", pa.table({"x": [1, 2, 3]}))
        pq.write_table(pa.table({"x": [1, 2, 4]}), w.tmp / "default" / "train-00000-of-00001.parquet")
    v = w.result.version
    assert v.manifest["data_files"] == _rereads(v)
    assert v.read("default")["x"].to_pylist() == [1, 2, 4]  # the hash describes what is stored

    store = DatasetStore(tmp_path / "b")
    with pytest.raises(CurateError, match="cannot be read back"):
        with store.new_version("w", builder="t", builder_version="0", params={}, sources=[]) as w:
            w.write_table("default", "train", pa.table({"x": list(range(1000))}))
            f = w.tmp / "default" / "train-00000-of-00001.parquet"
            f.write_bytes(f.read_bytes()[:-100])  # truncated: footer gone


def test_dfar_hash_is_unchanged(tmp_path: Path, dfar_source: Path) -> None:
    from builders.dfar import build_dfar

    v = build_dfar(DatasetStore(tmp_path), dfar_source).version
    assert v.hash == DFAR_HASH
    assert v.manifest["data_files"] == _rereads(v)
    # the inputs are hashed while the stream runs; the manifest still records each, in order
    want = [(str((dfar_source / f).resolve()), hashlib.sha256((dfar_source / f).read_bytes()).hexdigest())
            for f in ("DFAR_trainset.csv", "DFAR_testset.csv")]
    assert [(s["location"], s["sha256"]) for s in v.manifest["sources"]] == want


def test_id_set_filter_never_hides_a_member() -> None:
    """The top-bit filter only skips searches: ids that share a filter slot with a member are still told apart,
    and every member is found, against a plain Python set."""
    import numpy as np

    from builders.base import IdSet

    rng = np.random.default_rng(7)
    s, members = IdSet(), set()
    for _ in range(40):
        batch = rng.integers(0, 2**64, 500, dtype=np.uint64)
        s.add(batch)
        members.update(batch.tolist())
    every = np.array(sorted(members), dtype=np.uint64)
    near = every ^ np.uint64(1)  # same filter slot as a member, not a member (odds of a collision: nil)
    query = np.concatenate([every, near, rng.integers(0, 2**64, 5000, dtype=np.uint64)])
    rng.shuffle(query)
    assert s.contains(query).tolist() == [int(q) in members for q in query.tolist()]
