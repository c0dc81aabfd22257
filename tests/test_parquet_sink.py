"""ParquetSink: batches of any size become fixed row groups and Hub-named shards, registered with the version."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from builders.base import IdSet, ParquetSink
from curate.store import DatasetStore

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])


def _rows(start: int, n: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                     "text": [f"row {i}" for i in range(start, start + n)]})


def _build(store: DatasetStore, sizes: list[int]):
    with store.new_version("sink", builder="test", builder_version="0", params={}, sources=[]) as w:
        sink = ParquetSink(w, "default", "train", SCHEMA, row_group_rows=10, shard_rows=30)
        start = 0
        for n in sizes:
            sink.write(_rows(start, n))
            start += n
        sink.close()
    return w.result.version


def test_shards_row_groups_and_content(tmp_path) -> None:
    sizes = [7, 0, 13, 1, 29, 25]  # 75 rows in uneven batches
    v = _build(DatasetStore(tmp_path / "a"), sizes)
    files = v.files("default", "train")
    assert [f.name for f in files] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert [[pq.ParquetFile(f).metadata.row_group(g).num_rows for g in range(pq.ParquetFile(f).num_row_groups)]
            for f in files] == [[10, 10, 10], [10, 10, 10], [10, 5]]
    assert v.read("default")["id"].to_pylist() == list(range(75))
    assert v.manifest["configs"]["default"]["train"]["num_rows"] == 75
    # other batch sizes, same rows: same files, same content hash
    again = _build(DatasetStore(tmp_path / "b"), [75])
    assert again.hash == v.hash


def test_id_set_membership() -> None:
    import numpy as np

    s = IdSet()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 2**63, 1000, dtype=np.uint64) for _ in range(9)]
    for b in batches:
        s.add(b)
    assert len(s.runs) < 9  # merged as it grew
    every = np.concatenate(batches)
    assert s.contains(every).all()
    assert not s.contains(rng.integers(0, 2**63, 1000, dtype=np.uint64)).any()
