"""`curate build advantage`: A = log p_T - log p_ref at the teacher cache's ids, and the join's refusals.

Teacher and reference are two tiny random Llamas sharing the SmolLM2 tokenizer (tests/test_at_ids.py); the
expected advantages come from dense forward passes of both models in the test. Broken pairs (another
tokenizer, a lost parent, misaligned rows) are real store versions written from the good caches' rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from builders.advantage import (
    BuildResult,
    advantage_params,
    build_advantage,
    decode_advantage,
    encode_advantage,
    load_advantage,
)
from curate.cli import app
from curate.errors import CurateError
from curate.logit_codec import CACHE_CONFIG, load_cache
from curate.store import DatasetStore, Version
from tests.test_at_ids import PAIRS, dense, models, run, sides_store  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
STEP = 1 / 256  # small enough that some of the tiny random models' advantages (|A| < ~2) get clamped


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, sides_store: Path, models) -> Path:  # noqa: F811
    """A store with a teacher cache (k = 8, fp16) and the reference cache made --at-ids it (fp16)."""
    root = tmp_path_factory.mktemp("adv") / "store"
    shutil.copytree(sides_store, root)
    store = DatasetStore(root)
    assert isinstance(run(store, models["teacher"], k=8, quantization="fp16", name="tcache"), BuildResult)
    assert isinstance(run(store, models["reference"], at_ids="tcache", quantization="fp16", name="rcache"),
                      BuildResult)
    return root


def fresh(tmp_path: Path, root: Path) -> DatasetStore:
    shutil.copytree(root, tmp_path / "store")
    return DatasetStore(tmp_path / "store")


def clone(store: DatasetStore, v: Version, name: str, *, table: pa.Table | None = None,
          params: dict[str, Any] | None = None, parents: list[dict[str, Any]] | None = None) -> Version:
    """A copy of a cache version under another name, with some rows / params / parents changed."""
    m = v.manifest
    with store.new_version(name, builder=m["builder"]["name"], builder_version=m["builder"]["version"],
                           params={**m["params"], **(params or {})}, sources=[],
                           parents=m["parents"] if parents is None else parents) as w:
        t = table if table is not None else v.read(CACHE_CONFIG)
        for split in v.splits(CACHE_CONFIG):
            w.write_table(CACHE_CONFIG, split, t.filter(pa.compute.equal(t["split"], split)))
    return w.result.version


def test_advantage_is_teacher_minus_reference_at_the_teacher_ids(tmp_path: Path, caches: Path, models) -> None:  # noqa: F811
    store = fresh(tmp_path, caches)
    out = build_advantage(store, "tcache", "rcache", sides=("chosen", "rejected"), step=STEP)
    v = out.version
    p = advantage_params(v)
    assert v.name == "tcache-advantage" and p["k"] == 8 and p["sides"] == ["chosen", "rejected"]
    assert [(q["name"], q["role"]) for q in v.manifest["parents"]] == [("tcache", "teacher"), ("rcache", "reference")]
    teacher = {(c.split, c.id, c.side): c for c in load_cache(store.get("tcache"))}
    rows = load_advantage(v)
    within = 0
    assert len(rows) == 2 * len(PAIRS) and {r.split for r in load_advantage(v, "test")} == {"test"}
    tol = STEP / 2 + 2 * 1e-2  # half a code + the two fp16 caches' rounding (|lp| < 16)
    limit = 127 * STEP
    for r in rows:
        c = teacher[(r.split, r.id, r.side)]
        assert np.array_equal(r.topk_ids, c.topk_ids) and r.input_ids == c.input_ids.tolist()
        ids = torch.from_numpy(r.topk_ids)
        want = (dense(models["teacher"][1], c.input_ids, c.prompt_len).gather(-1, ids)
                - dense(models["reference"][1], c.input_ids, c.prompt_len).gather(-1, ids)).numpy()
        inside = np.abs(want) < limit - tol
        assert np.all(np.abs(r.advantage - want)[inside] <= tol)
        assert np.all(np.abs(r.advantage[~inside]) >= limit - 2 * tol)  # clamped at the range's ends
        within += int(inside.sum())
    assert 0.25 * p["advantage_entries"] < within < p["advantage_entries"]  # both kinds were checked
    assert p["clamped_entries"] > 0 and any("clamped" in n for n in out.notes)


def test_default_sides_rejected_and_delta_encoding(tmp_path: Path, caches: Path) -> None:
    store = fresh(tmp_path, caches)
    plain = load_advantage(build_advantage(store, "tcache", "rcache", name="plain").version)
    delta_v = build_advantage(store, "tcache", "rcache", name="delta", encoding="i8-delta").version
    delta = load_advantage(delta_v)
    assert advantage_params(delta_v)["advantage_encoding"] == "i8-delta"
    for a, b in zip(plain, delta, strict=True):
        assert np.array_equal(a.advantage, b.advantage)  # delta decodes to exactly the plain codes
        if a.side == "chosen":
            assert a.topk_ids.shape == (0, 0) and a.advantage.shape == (0, 0) and len(a.input_ids) > a.prompt_len
        else:
            assert a.topk_ids.shape == (len(a.input_ids) - a.prompt_len, 8)


def test_codes_round_trip_with_wraparound() -> None:
    rng = np.random.default_rng(0)
    adv = rng.normal(0, 5, 600).astype(np.float32)
    offsets = np.array([0, 50, 50, 300, 600])  # an empty token too
    for enc in ("i8", "i8-delta"):
        back = decode_advantage(encode_advantage(adv, offsets, 1 / 16, enc), offsets, 1 / 16, enc)
        assert np.allclose(back, np.clip(np.rint(adv * 16), -127, 127) / 16)


def test_refuses_tokenizer_mismatch_missing_parent_and_misaligned_rows(tmp_path: Path, caches: Path) -> None:
    store = fresh(tmp_path, caches)
    t, r = store.get("tcache"), store.get("rcache")
    other_tok = clone(store, r, "r-tok", params={"tokenizer_fingerprint": "sha256:0000"})
    with pytest.raises(CurateError, match="different tokenizers"):
        build_advantage(store, "tcache", other_tok.ref)
    # a reference cached on its own (not --at-ids the teacher): the teacher is not among its parents
    own = clone(store, r, "r-own", parents=r.manifest["parents"][:1], params={"at_ids": None})
    with pytest.raises(CurateError, match="was not made --at-ids tcache@v1.*missing from its parents"):
        build_advantage(store, "tcache", own.ref)
    # the teacher's parent (the preferences version) gone from the store
    lost = clone(store, t, "t-lost", parents=[{**t.manifest["parents"][0], "content_hash": "f" * 64}])
    lost_ref = clone(store, r, "r-lost", params={"at_ids": {"name": lost.name, "tag": lost.tag,
                                                            "content_hash": lost.hash}},
                     parents=[r.manifest["parents"][0], {"name": lost.name, "tag": lost.tag,
                                                         "content_hash": lost.hash}])
    with pytest.raises(CurateError, match="t-lost@v1's parent preferences@v1 \\(ffffffffffff\\) is missing"):
        build_advantage(store, lost.ref, lost_ref.ref)
    # misaligned rows: rewrite copies of the reference whose rows differ, with the real lineage kept
    table = r.read(CACHE_CONFIG)
    i = 3
    key = f"row id {table['id'][i]} side {table['side'][i]} \\({table['split'][i]}\\)"

    def with_row(col: str, value: Any) -> Version:
        vals = table[col].to_pylist()
        vals[i] = value
        changed = table.set_column(table.schema.get_field_index(col), col, pa.array(vals, table.schema.field(col).type))
        return clone(store, r, f"r-{col.replace('_', '-')}", table=changed)

    ids = table["topk_ids"].to_pylist()[i]
    ids[1] = [ids[1][1], ids[1][0], *ids[1][2:]]
    for col, value, what in (("topk_ids", ids, "kept ids"),
                             ("input_ids", table["input_ids"].to_pylist()[i][:-1] + [7], "input_ids"),
                             ("id", "p99", "")):
        v = with_row(col, value)
        pattern = (f"misaligned caches: {key}: {what} differ" if what
                   else "misaligned caches: row id p\\w+ side \\w+ \\(train\\) is in")
        with pytest.raises(CurateError, match=pattern):
            build_advantage(store, "tcache", v.ref)
    assert not any(n.endswith("-advantage") for n in store.names())


def test_cli_build_advantage(tmp_path: Path, caches: Path) -> None:
    store = fresh(tmp_path, caches)
    runner = CliRunner()
    res = runner.invoke(app, ["build", "advantage", "--teacher", "tcache", "--reference", "rcache", "--store",
                              str(store.root)])
    assert res.exit_code == 0, res.output
    assert "built tcache-advantage@v1" in res.output and "bytes/token" in res.output
    res = runner.invoke(app, ["build", "advantage", "--teacher", "tcache", "--reference", "tcache", "--store",
                              str(store.root)])
    assert res.exit_code != 0 and "was not made --at-ids" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["build", "advantage", "--help"])
    assert "rejected" in res.output and "default" in res.output.lower()
