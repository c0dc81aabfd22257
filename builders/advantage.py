"""Advantage table for ADPA: A(v) = log p_T(v) - log p_ref(v) at the DPO teacher's kept ids, per response token.

Input: a teacher cache and a reference cache made ``--at-ids`` that teacher cache (same rows, same input_ids,
exactly the teacher's kept ids per token). The two are joined on the row key (split, id, side) with an Arrow
hash join and checked to be aligned token by token (input_ids, per-token kept ids); everything after the join
runs on flat Arrow/numpy buffers, never a Python loop over tokens, so it scales with the caches.

Columns (config ``default``, one row per cache row, in the teacher cache's order)::

    id          string
    side        string, only when the caches have it (preferences ``sides``); the row key is (id, side)
    split       string
    input_ids   list<uint16|uint32>                 the caches' tokenization of prompt + completion
    prompt_len  int32
    topk_ids    list<list<uint16|uint32>> [T][n_t]  the teacher's kept ids (empty list for sides left out)
    advantage   list<list<int8>> [T][n_t]           A as codes: code = clip(round(A / step), -127, 127)

``params.step`` (default 1/16 nat; error <= step/2 on top of the caches' own) and ``params.clamp`` (+-127 *
step) say how to decode; ``params.advantage_encoding`` ``i8-delta`` stores each code as the difference from
the previous one in its token (mod 256). Teacher log-probs and residuals are not copied: they stay in the
teacher cache (a parent). Read it with `load_advantage`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from builders.base import BuildResult
from curate.errors import CurateError
from curate.logit_codec import CACHE_CONFIG, cache_params, get_scheme
from curate.store import DatasetStore, Version

log = logging.getLogger(__name__)

BUILDER = "advantage"
BUILDER_VERSION = "1.0.0"
DEFAULT_STEP = 1 / 16  # the u8 caches' own step: A of two u8 caches lies on this grid, so the codes add no error
Encoding = Literal["i8", "i8-delta"]
SIDES = ("chosen", "rejected")


@dataclass
class AdvantageExample:
    """One row as the ADPA trainer consumes it (decoded, numpy)."""

    id: str
    side: str | None
    split: str
    input_ids: list[int]
    prompt_len: int
    topk_ids: np.ndarray  # int64 [T, k] (T = completion tokens; [0, 0] for a side without advantage); pad id 0
    advantage: np.ndarray  # float32 [T, k], nats; 0 on padding
    valid: np.ndarray | None = None  # bool [T, k], False on padding (rows keeping fewer than k entries)


# ---- flat views of list<list<>> columns -----------------------------------------------------------------
def _chunk(col: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _offsets(arr: pa.ListArray) -> np.ndarray:
    """Offsets rebased to 0 (a sliced array's offsets start elsewhere)."""
    off = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    return off - off[0]


def _flat2(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """list<list<v>> -> (row offsets over tokens, token offsets over entries, flat values)."""
    outer = _chunk(col)
    inner = outer.flatten()
    return _offsets(outer), _offsets(inner), inner.flatten().to_numpy(zero_copy_only=False)


def _flat1(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = _chunk(col)
    return _offsets(arr), arr.flatten().to_numpy(zero_copy_only=False)


def _segment_cumsum(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each segment start (vectorised segmented scan)."""
    cs = np.cumsum(x, dtype=np.int64)
    starts = offsets[:-1]
    base = np.where(starts > 0, cs[np.maximum(starts - 1, 0)], 0)
    return cs - np.repeat(base, np.diff(offsets))


def _decode_flat(codes: np.ndarray, entry_offsets: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """A cache's stored log-probs (any scheme) -> float32, flat, without padding."""
    scheme = get_scheme(params["quantization"])
    if scheme.step is None:
        return codes.astype(np.float32)
    c = codes.astype(np.int64)
    if scheme.delta:
        c = _segment_cumsum(c, entry_offsets)
    return (-c * scheme.step).astype(np.float32)


def encode_advantage(adv: np.ndarray, entry_offsets: np.ndarray, step: float, encoding: Encoding) -> np.ndarray:
    """Flat float advantages -> int8 codes (round to ``step``, clamp to +-127 steps); delta: the difference from
    the previous code of the same token, wrapping mod 256 (exactly invertible)."""
    codes = np.clip(np.rint(np.nan_to_num(adv) / step), -127, 127).astype(np.int64)
    if encoding == "i8-delta":
        prev = np.concatenate([[0], codes[:-1]])
        prev[entry_offsets[:-1][np.diff(entry_offsets) > 0]] = 0  # each token starts from 0
        codes = (codes - prev + 128) % 256 - 128
    return codes.astype(np.int8)


def decode_advantage(codes: np.ndarray, entry_offsets: np.ndarray, step: float, encoding: str) -> np.ndarray:
    c = codes.astype(np.int64)
    if encoding == "i8-delta":
        c = (_segment_cumsum(c, entry_offsets) + 128) % 256 - 128
    return (c * step).astype(np.float32)


# ---- checks --------------------------------------------------------------------------------------------
def _ref(v: Version) -> dict[str, str]:
    return {"name": v.name, "tag": v.tag, "content_hash": v.hash}


def _parent_present(store: DatasetStore, q: dict[str, Any]) -> bool:
    try:
        return store.find_by_hash(q["name"], q["content_hash"]) is not None
    except CurateError:  # no dataset of that name
        return False


def _where(keys: pa.Table, i: int) -> str:
    row = {c: keys[c][i].as_py() for c in keys.column_names}
    side = f" side {row['side']}" if row.get("side") is not None else ""
    return f"row id {row['id']}{side} ({row['split']})"


def check_pair(store: DatasetStore, teacher: Version, reference: Version) -> tuple[dict[str, Any], dict[str, Any]]:
    """Refuse (one line) caches that cannot be joined: another tokenizer, a reference not made --at-ids this
    teacher cache, or a parent (of either) missing from the store."""
    tp, rp = cache_params(teacher), cache_params(reference)
    if tp.get("tokenizer_fingerprint") != rp.get("tokenizer_fingerprint"):
        raise CurateError(f"{teacher.ref} and {reference.ref} were made with different tokenizers "
                          f"({tp.get('tokenizer_fingerprint')} vs {rp.get('tokenizer_fingerprint')}): their ids "
                          "do not mean the same tokens")
    lineage = [q for q in reference.manifest.get("parents", []) if q.get("content_hash") == teacher.hash]
    if not lineage or (rp.get("at_ids") or {}).get("content_hash") != teacher.hash:
        raise CurateError(f"{reference.ref} was not made --at-ids {teacher.ref}: {teacher.ref} "
                          f"({teacher.hash[:12]}) is missing from its parents (rerun cache-logits with "
                          f"--at-ids {teacher.ref})")
    for v in (teacher, reference):
        for q in v.manifest.get("parents", []):
            if not _parent_present(store, q):
                raise CurateError(f"{v.ref}'s parent {q.get('name')}@{q.get('tag')} "
                                  f"({str(q.get('content_hash'))[:12]}) is missing from store {store.root}")
    return tp, rp


def _read(v: Version) -> pa.Table:
    """The columns the join needs (not residual / entropy / label log-probs)."""
    files = v.files(CACHE_CONFIG)
    names = pq.read_schema(files[0]).names
    cols = [c for c in ("id", "side", "split", "input_ids", "prompt_len", "topk_ids", "topk_logprobs") if c in names]
    return pa.concat_tables([pq.read_table(f, columns=cols) for f in files])


def join_rows(t: pa.Table, r: pa.Table, teacher: Version, reference: Version) -> pa.Table:
    """The reference rows in the teacher's order (Arrow hash join on split, id[, side]); refuse rows present
    in one cache only and duplicate keys."""
    if ("side" in t.column_names) != ("side" in r.column_names):
        raise CurateError(f"{teacher.ref} and {reference.ref} disagree on having a side column: not the same rows")
    key = ["split", "id"] + (["side"] if "side" in t.column_names else [])
    for tab, v in ((t, teacher), (r, reference)):
        counts = tab.select(key).group_by(key).aggregate([([], "count_all")])
        dup = pc.indices_nonzero(pc.greater(counts["count_all"], 1))
        if len(dup):
            raise CurateError(f"{v.ref}: {_where(counts, dup[0].as_py())} appears more than once")
    tk = t.select(key).append_column("_t", pa.array(np.arange(t.num_rows)))
    rk = r.select(key).append_column("_r", pa.array(np.arange(r.num_rows)))
    j = tk.join(rk, keys=key, join_type="full outer")
    for col, have, lack in (("_r", teacher, reference), ("_t", reference, teacher)):
        missing = pc.indices_nonzero(pc.is_null(j[col]))
        if len(missing):
            raise CurateError(f"misaligned caches: {_where(j.select(key), missing[0].as_py())} is in {have.ref} "
                              f"but not in {lack.ref}")
    j = j.sort_by("_t")
    return r.take(j["_r"])


def _first_bad_row(bad_tokens: np.ndarray, token_rows: np.ndarray) -> int | None:
    rows = token_rows[bad_tokens]
    return int(rows.min()) if len(rows) else None


def check_aligned(t: pa.Table, r: pa.Table, teacher: Version, reference: Version) -> None:
    """Same prompt_len and input_ids per row, same kept ids per token: refuse the first row that differs."""
    keys = t.select(["split", "id"] + (["side"] if "side" in t.column_names else []))

    def refuse(i: int, what: str) -> None:
        raise CurateError(f"misaligned caches: {_where(keys, i)}: {what} differ between {teacher.ref} and "
                          f"{reference.ref}")

    bad = np.flatnonzero(t["prompt_len"].to_numpy() != r["prompt_len"].to_numpy())
    if len(bad):
        refuse(int(bad[0]), "prompt_len")
    t_off, t_ids = _flat1(t["input_ids"])
    r_off, r_ids = _flat1(r["input_ids"])
    bad = np.flatnonzero(np.diff(t_off) != np.diff(r_off))
    if len(bad):
        refuse(int(bad[0]), "input_ids")
    row_of = np.repeat(np.arange(t.num_rows), np.diff(t_off))
    i = _first_bad_row(t_ids != r_ids, row_of)
    if i is not None:
        refuse(i, "input_ids")
    t_rows, t_ent, t_k = _flat2(t["topk_ids"])
    r_rows, r_ent, r_k = _flat2(r["topk_ids"])
    bad = np.flatnonzero(np.diff(t_rows) != np.diff(r_rows))
    if len(bad):
        refuse(int(bad[0]), "token counts")
    token_row = np.repeat(np.arange(t.num_rows), np.diff(t_rows))
    i = _first_bad_row(np.diff(t_ent) != np.diff(r_ent), token_row)
    if i is not None:
        refuse(i, "kept ids per token")
    entry_row = np.repeat(token_row, np.diff(t_ent))
    i = _first_bad_row(t_k != r_k, entry_row)
    if i is not None:
        refuse(i, "kept ids")


# ---- build ---------------------------------------------------------------------------------------------
def advantage_table(t: pa.Table, r: pa.Table, tp: dict[str, Any], rp: dict[str, Any], *, sides: tuple[str, ...],
                    step: float, encoding: Encoding) -> tuple[pa.Table, dict[str, Any]]:
    """Aligned teacher / reference rows -> the advantage rows and their statistics (flat, vectorised)."""
    row_tok, tok_ent, ids = _flat2(t["topk_ids"])
    _, _, t_codes = _flat2(t["topk_logprobs"])
    _, _, r_codes = _flat2(r["topk_logprobs"])
    t_lp, r_lp = _decode_flat(t_codes, tok_ent, tp), _decode_flat(r_codes, tok_ent, rp)
    adv = t_lp - r_lp
    # a u8 cache clips log-probs at -255 steps: there A is a bound, not a value (counted, like clamped entries)
    floored_all = np.zeros(len(adv), dtype=bool)
    for lp, p in ((t_lp, tp), (r_lp, rp)):
        floor = get_scheme(p["quantization"]).floor  # None for fp16: nothing is clipped
        if floor is not None:
            floored_all |= lp <= floor
    tokens_per_row = np.diff(row_tok)
    keep_row = (np.isin(t["side"].to_numpy(zero_copy_only=False), list(sides)) if "side" in t.column_names
                else np.ones(t.num_rows, dtype=bool))
    keep_tok = np.repeat(keep_row, tokens_per_row)
    per_tok = np.diff(tok_ent)
    keep_ent = np.repeat(keep_tok, per_tok)
    adv, ids, floored = adv[keep_ent], ids[keep_ent], floored_all[keep_ent]
    new_row_tok = np.concatenate([[0], np.cumsum(np.where(keep_row, tokens_per_row, 0))])
    new_tok_ent = np.concatenate([[0], np.cumsum(per_tok[keep_tok])])
    codes = encode_advantage(adv, new_tok_ent, step, encoding)
    id_type = t.schema.field("topk_ids").type

    def nested(values: pa.Array) -> pa.Array:
        inner = pa.ListArray.from_arrays(pa.array(new_tok_ent.astype(np.int32)), values)
        return pa.ListArray.from_arrays(pa.array(new_row_tok.astype(np.int32)), inner)

    cols = {"id": t["id"], **({"side": t["side"]} if "side" in t.column_names else {}), "split": t["split"],
            "input_ids": t["input_ids"], "prompt_len": t["prompt_len"],
            "topk_ids": nested(pa.array(ids, id_type.value_type.value_type)),
            "advantage": nested(pa.array(codes, pa.int8()))}
    table = pa.table(cols)
    limit = 127 * step
    finite = adv[np.isfinite(adv)]
    stats = {
        "advantage_tokens": int(keep_tok.sum()),
        "advantage_entries": int(len(adv)),
        "completion_tokens": int(tokens_per_row.sum()),
        "clamped_entries": int((np.abs(finite) > limit).sum()),
        "floored_entries": int(floored.sum()),
        "advantage_mean": round(float(finite.mean()), 4) if len(finite) else None,
        "advantage_abs_mean": round(float(np.abs(finite).mean()), 4) if len(finite) else None,
        "advantage_min": round(float(finite.min()), 4) if len(finite) else None,
        "advantage_max": round(float(finite.max()), 4) if len(finite) else None,
    }
    return table, stats


def build_advantage(store: DatasetStore, teacher: str, reference: str, *, name: str | None = None,
                    sides: tuple[str, ...] = ("rejected",), step: float = DEFAULT_STEP,
                    encoding: Encoding = "i8", rows_per_file: int = 2000) -> BuildResult:
    """Join a teacher cache and its ``--at-ids`` reference cache into ``<teacher>-advantage`` (see module doc)."""
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise CurateError(f"--sides takes {' and/or '.join(SIDES)} (comma-separated), not {','.join(sides)!r}")
    if not 0 < step <= 1:
        raise CurateError(f"--step must be in (0, 1] nats, got {step}")
    if encoding not in ("i8", "i8-delta"):
        raise CurateError(f"--encoding must be i8 or i8-delta, not {encoding!r}")
    tv, rv = store.get(teacher), store.get(reference)
    tp, rp = check_pair(store, tv, rv)
    t, r = _read(tv), _read(rv)
    r = join_rows(t, r, tv, rv)
    check_aligned(t, r, tv, rv)
    table, stats = advantage_table(t, r, tp, rp, sides=sides, step=step, encoding=encoding)
    notes = []
    if "side" not in t.column_names:
        notes.append(f"{tv.ref} has no side column: every row gets advantages (--sides does not apply)")
    if stats["clamped_entries"]:
        notes.append(f"{stats['clamped_entries']:,} of {stats['advantage_entries']:,} advantages beyond "
                     f"+-{127 * step:.3g} nats clamped (a larger --step widens the range)")
    if stats["floored_entries"]:
        notes.append(f"{stats['floored_entries']:,} of {stats['advantage_entries']:,} advantages involve a log-prob "
                     "clipped at a u8 cache's floor (A is then only a bound): cache with --quantization fp16 to "
                     "avoid it")
    errs = [get_scheme(p["quantization"]).max_error for p in (tp, rp)]
    params: dict[str, Any] = {
        "teacher": _ref(tv),
        "reference": _ref(rv),
        "teacher_model": tp.get("teacher"),
        "reference_model": rp.get("teacher"),
        "tokenizer_fingerprint": tp.get("tokenizer_fingerprint"),
        "vocab_size": tp.get("vocab_size"),
        "k": tp["k"],
        "max_entries": int(tp.get("max_entries", tp["k"])),
        "select": tp.get("select", "top"),
        **{k: tp.get(k) for k in ("template", "template_rule", "chat_template_sha256", "label_prefix",
                                  "label_words", "parent_config", "max_length", "limit")},
        "sides": list(sides) if "side" in t.column_names else None,
        "definition": "A = log p_teacher - log p_reference at the teacher cache's kept ids, per completion token "
                      "(row t predicts input_ids[prompt_len + t])",
        "advantage_encoding": encoding,
        "step": step,
        "clamp": [-127 * step, 127 * step],
        "max_error": round(step / 2 + sum(errs), 6),
        "max_error_rule": "step/2 from the codes plus the two caches' own quantisation errors (teacher "
                          f"{tp['quantization']}, reference {rp['quantization']}); clamped and floored entries "
                          "excepted",
        "splits": list(dict.fromkeys(t["split"].to_pylist())),
        **stats,
    }
    parents = [{**_ref(tv), "config": CACHE_CONFIG, "role": "teacher"},
               {**_ref(rv), "config": CACHE_CONFIG, "role": "reference"}]
    card = {
        "pretty_name": f"Advantages of {tv.ref} over {rv.ref}",
        "description": ("Per response token, the DPO teacher's advantage A = log p_T - log p_ref at its kept ids "
                        "(ADPA, Advantage-Guided Distillation for Preference Alignment). Read it with "
                        "`builders.advantage.load_advantage`."),
        "license": tv.manifest.get("card", {}).get("license"),
        "task_categories": ["text-generation"],
        "tags": ["knowledge-distillation", "preference-alignment", "advantage", tv.name],
        "default_config": CACHE_CONFIG,
        "config_notes": {CACHE_CONFIG: "one row per cache row; see builders/advantage.py for the columns"},
        "build_notes": "\n".join(f"- {n}" for n in notes) or None,
    }
    out_name = name or f"{tv.name}-advantage"
    with store.new_version(out_name, builder=BUILDER, builder_version=BUILDER_VERSION, params=params, sources=[],
                           parents=parents, card=card) as w:
        for split in params["splits"]:
            w.write_table(CACHE_CONFIG, split, table.filter(pc.equal(table["split"], split)),
                          rows_per_shard=rows_per_file)
        size = sum(f.stat().st_size for f in w.tmp.rglob("*.parquet"))
        w.add_params({"bytes": size,
                      "bytes_per_token": round(size / max(stats["advantage_tokens"], 1), 2),
                      "bytes_per_completion_token": round(size / max(stats["completion_tokens"], 1), 2)})
    log.info("advantage %s: %s", w.result.version.ref, stats)
    return BuildResult(w.result.version, w.result.created, notes, repaired=w.result.repaired)


# ---- reading -------------------------------------------------------------------------------------------
def advantage_params(version: Version) -> dict[str, Any]:
    """The manifest params of an advantage version (tokenizer_fingerprint, teacher, reference, k, template,
    label_prefix, step, ...); refuses any other version."""
    builder = (version.manifest.get("builder") or {}).get("name")
    if builder != BUILDER:
        raise CurateError(f"{version.ref} is not an advantage table (built by {builder!r}, not `curate build "
                          "advantage`)")
    return dict(version.manifest.get("params", {}))


def _padded(values: np.ndarray, tok_ent: np.ndarray, width: int, fill: Any) -> tuple[np.ndarray, np.ndarray]:
    per = np.diff(tok_ent)
    tok = np.repeat(np.arange(len(per)), per)
    pos = np.arange(len(values)) - np.repeat(tok_ent[:-1], per)
    out = np.full((len(per), width), fill, dtype=values.dtype)
    out[tok, pos] = values
    valid = np.zeros((len(per), width), dtype=bool)
    valid[tok, pos] = True
    return out, valid


def decode_rows(table: pa.Table | pa.RecordBatch, params: dict[str, Any]) -> list[AdvantageExample]:
    """Arrow rows -> AdvantageExample objects (decoded per column, then sliced per row)."""
    width = int(params.get("max_entries", params["k"]))
    row_tok, tok_ent, ids = _flat2(table.column("topk_ids"))
    _, _, codes = _flat2(table.column("advantage"))
    adv = decode_advantage(codes, tok_ent, float(params["step"]), params.get("advantage_encoding", "i8"))
    ids_p, valid = _padded(ids.astype(np.int64), tok_ent, width, 0)
    adv_p, _ = _padded(adv, tok_ent, width, 0.0)
    in_off, in_ids = _flat1(table.column("input_ids"))
    names = table.schema.names
    n = table.num_rows
    sides = table.column("side").to_pylist() if "side" in names else [None] * n
    out = []
    for i, (ex_id, split, plen) in enumerate(zip(table.column("id").to_pylist(), table.column("split").to_pylist(),
                                                 table.column("prompt_len").to_pylist(), strict=True)):
        a, b = row_tok[i], row_tok[i + 1]
        shape = (0, 0) if a == b else None
        out.append(AdvantageExample(
            id=ex_id, side=sides[i], split=split, input_ids=in_ids[in_off[i]:in_off[i + 1]].astype(np.int64).tolist(),
            prompt_len=int(plen),
            topk_ids=np.zeros(shape, np.int64) if shape else ids_p[a:b],
            advantage=np.zeros(shape, np.float32) if shape else adv_p[a:b],
            valid=np.zeros(shape, bool) if shape else valid[a:b]))
    return out


def load_advantage(version: Version, split: str | None = None) -> list[AdvantageExample]:
    """Every row of an advantage version (or of one split), in the teacher cache's order."""
    params = advantage_params(version)
    return [ex for path in version.files(CACHE_CONFIG, split) for ex in decode_rows(pq.read_table(path), params)]
