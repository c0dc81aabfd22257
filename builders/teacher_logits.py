"""Teacher-logit cache for offline KD: run a teacher once over a dataset version, keep a compact sparse
view of its distributions (top-k log-probs + residual mass + label-verbalizer log-probs) as a new version.

How the work is organised, so that runs are resumable, shardable and byte-reproducible:

1. Every example of the chosen splits is tokenized (prompt, then completion, concatenated) and the whole set
   is sorted by length (longest first) and cut into fixed *work units* of ``chunk_size`` examples, each run
   as ``batch_size`` padded batches. The plan depends only on the inputs, never on the number of shards.
2. Unit ``i`` belongs to shard ``i % num_shards``. A finished unit is one parquet file in the store's work
   dir, written to a temp name and renamed, so a killed run leaves only whole units; rerunning skips them.
3. When every unit exists, the merge puts rows back in the parent's order and writes one atomic version.
   Because units (and their batches) are the same whatever the sharding, sharded + merge == unsharded.

A parent with a ``side`` column (preferences ``sides``) keeps it per row; the row key is then (id, side).
``--at-ids <cache>`` scores this model at exactly that cache's kept ids (same parent rows, tokenizer and
input_ids, else a one-line refusal naming the row), reusing its row, template and label settings; the other
cache becomes a second parent. `builders.advantage` joins the two into the ADPA advantage table.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from builders.base import BuildResult
from curate.configs import ConfigError, opt, validated
from curate.errors import CurateError
from curate.logit_codec import (
    CACHE_CONFIG,
    DEFAULT_SCHEME,
    LAYOUT,
    PLAIN_SCHEME,
    SCHEMES,
    Scheme,
    _nested,
    _padded_entries,
    cache_params,
    cache_schema,
    encode_logprobs,
    get_scheme,
)
from curate.models import (
    SMOLLM2,
    TEMPLATES,
    ModelRef,
    ModelSpec,
    Template,
    load_causal_lm,
    load_tokenizer,
    model_files_key,
    prompt_token_ids,
    tokenizer_fingerprint,
)
from curate.store import DatasetStore, SourceFile, Version, sha256_file

# 2: layout 2 (variable-length rows, sampled rows). Part of the work-dir key, so it stays put for additions that
# leave earlier units valid (--tail-samples adds a key field only when used), keeping unfinished runs resumable.
BUILDER_VERSION = "2.0.0"
REQUIRED_COLUMNS = ("id", "prompt", "completion")
ANSWER_POSITION = (
    "logits at position prompt_len - 1 (the distribution over the first completion token); each label word is "
    "scored by the first token of label_prefix + word"
)
# Not part of what is computed: left out of the work-dir key.
NOT_IN_KEY = ("dataset", "device", "rows_per_file", "name")


def parse_label_words(spec: str) -> dict[int, str]:
    """`ethical,unethical` -> {0: 'ethical', 1: 'unethical'} (label values in order)."""
    words = [w.strip() for w in spec.split(",")]
    if any(not w for w in words):
        raise CurateError(f"--label-words wants comma-separated words, got {spec!r}")
    return dict(enumerate(words))


# Named settings, chosen by measurement (benchmarks/logit_cache_bench.py, README "Teacher-logit cache").
PRESETS: dict[str, dict[str, Any]] = {
    # <= 100 B/token at KL <= 0.29 nats on SmolLM2 DFAR lr (measured: README); about 44 entries per token
    "small": {"k": 128, "entry_cost": 0.0052, "quantization": "u8-delta-coarse"},
}
PRESETS_HELP = [f"{n}: " + " ".join(f"{k}={v}" for k, v in d.items()) for n, d in PRESETS.items()]
# A preset's part that chooses the kept entries: an explicit choice (see `preset_values`) replaces all of it.
PRESET_SELECTION = ("top_p", "entry_cost", "select", "samples", "proposal_temperature")
DEFAULT_SAMPLES = 16  # --samples when not given; another value without --select sample is refused


@dataclass
class LogitCacheConfig(ModelSpec):
    """Everything that changes the cache's content (the work-dir key and the manifest are built from it)."""

    model: str = opt(SMOLLM2, "Teacher: hub id, local folder, .gguf file, or 'smollm2'.", flags=("--teacher",))
    dataset: str = opt("dfar", "Parent dataset (name or name@tag).")
    config: str = opt("lr", "Parent config with id, prompt, completion (dfar: l or lr).")
    splits: list[str] | None = opt(None, "Comma-separated splits (default: all).", flags=("--split",))
    subsets: list[str] | None = opt(None, "Comma-separated subsets of a parent with a subset column (ethics "
                                          "instruct); default all.")
    k: Annotated[int, at.Ge(1)] = opt(64, "Top-k entries kept per completion token (the cap with --top-p).")
    top_p: Annotated[float, at.Gt(0), at.Le(1)] | None = opt(
        None, "Keep per token the fewest top entries whose mass reaches this (between --k-min and --k).")
    k_min: Annotated[int, at.Ge(1)] = opt(1, "Fewest entries per token with --top-p / --entry-cost.")
    entry_cost: Annotated[float, at.Gt(0)] | None = opt(
        None, "Keep per token the n (--k-min..--k) minimising KL(teacher || cache row) + this * n (nats per entry): "
        "the budget-optimal allocation.")
    select: Literal["top", "sample"] = opt(
        "top", "top: the most probable ids; sample: the distinct ids of --samples draws from the teacher "
        "(unbiased forward-KL estimate).")
    samples: Annotated[int, at.Ge(1), at.Le(4096)] = opt(DEFAULT_SAMPLES, "Draws per token with --select sample.")
    tail_samples: Annotated[int, at.Ge(0), at.Le(255)] = opt(
        0, "Also keep the ids of this many draws per token from the teacher outside the kept ids: forward KD then "
        "gets an unbiased estimate of the tail the top entries leave out.")
    proposal_temperature: Annotated[float, at.Gt(0)] = opt(
        1.0, "With --select sample: draw from softmax(logits / this) (> 1 reaches further into the tail); stored "
        "importance weights keep the KD estimate unbiased.")
    layout: Annotated[int, at.Ge(1), at.Le(LAYOUT)] = opt(
        LAYOUT, "2: variable-length rows; 1: exactly k entries per row (readers before v2).")
    preset: str | None = opt(None, f"Named settings ({', '.join(PRESETS_HELP)}); explicit options win.")
    quantization: str = opt(DEFAULT_SCHEME, f"Log-prob storage: {', '.join(SCHEMES)}.")
    template: Template = opt("plain", "plain (prompt + completion) or chat (chat template).")
    label_words: dict[int, str] | None = opt(
        None, "Label words in label order, e.g. ethical,unethical (default: the rows' label_text; per subset "
        "when the parent's subsets have their own words, e.g. ethics instruct).",
        parse=parse_label_words)
    label_prefix: str = opt(" ", "Text before the label word in the completion.")
    max_length: Annotated[int, at.Ge(2)] | None = opt(1024, "Longer examples lose completion tokens (reported).")
    batch_size: Annotated[int, at.Ge(1)] = opt(8, "Sequences per forward pass.")
    chunk_size: Annotated[int, at.Ge(1)] = opt(64, "Examples per resumable work unit.")
    limit: Annotated[int, at.Ge(0)] | None = opt(None, "Only the first N rows of each split (0: all).")
    rows_per_file: Annotated[int, at.Ge(1)] = opt(2000, "Rows per parquet file of the version.")
    name: str | None = opt(None, "Cache dataset name (default <parent>-<config>-logits).")
    at_ids: str | None = opt(
        None, "Score this model exactly at another cache's kept ids (name@tag; same parent rows and tokenizer): "
        "its tokenization, template, label and row settings are reused; delta quantization is stored plain.",
        flags=("--at-ids",))

    def validate(self) -> None:
        """Cross-field rules (one-line errors, for flags, YAML and Python alike)."""
        if self.k_min > self.k:
            raise ConfigError("k_min", f"--k-min {self.k_min} is larger than --k {self.k}")
        if self.top_p is not None and self.entry_cost is not None:
            raise ConfigError("entry_cost", "--top-p and --entry-cost are two ways to choose the kept entries: "
                              "give one")
        if self.layout == 1 and (self.top_p is not None or self.entry_cost is not None or self.select == "sample"):
            raise ConfigError("layout", "--layout 1 stores exactly k entries per token: it cannot hold --top-p or "
                              "--select sample rows")
        if self.proposal_temperature != 1.0 and self.select != "sample":
            raise ConfigError("proposal_temperature", "--proposal-temperature is for --select sample")
        # Like the temperature: a value other than the default means sampling was meant. (The default itself
        # cannot be told from an explicit 16; a default of None would change every existing work-dir key.)
        if self.samples != DEFAULT_SAMPLES and self.select != "sample":
            raise ConfigError("samples", "--samples is for --select sample")
        if self.at_ids is not None and (self.top_p is not None or self.entry_cost is not None
                                        or self.select == "sample"):
            raise ConfigError("at_ids", "--at-ids scores exactly the other cache's ids: --top-p, --entry-cost and "
                              "--select sample do not apply")
        if self.tail_samples and (self.select == "sample" or self.at_ids is not None or self.layout == 1):
            raise ConfigError("tail_samples", "--tail-samples adds draws to a top selection (--select top, layout 2, "
                              "no --at-ids)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError("preset", f"--preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")

    @property
    def max_entries(self) -> int:
        """The most entries a token can keep (readers pad rows to it)."""
        return self.samples if self.select == "sample" else self.k


def preset_values(name: str | None, explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The option values a preset stands for (lowest layer under YAML / flags).

    ``explicit``: the options given on top of it. When they choose the kept entries themselves (--top-p,
    --entry-cost, --select sample, --at-ids, --layout 1), the preset's selection (its entry_cost) is left out
    rather than conflicting with them: explicit options override the preset, as documented.
    """
    if name is None:
        return {}
    if name not in PRESETS:
        raise CurateError(f"--preset must be one of {', '.join(PRESETS)}, not {name!r}")
    values = {**PRESETS[name], "preset": name}
    if explicit is not None and _chooses_entries(explicit):
        for key in PRESET_SELECTION:
            values.pop(key, None)
    return values


def _chooses_entries(options: Mapping[str, Any]) -> bool:
    """Whether `options` say how the kept entries are chosen (so a preset's choice does not apply)."""
    return (options.get("top_p") is not None or options.get("entry_cost") is not None
            or options.get("select") == "sample" or options.get("at_ids") is not None or options.get("layout") == 1)


@dataclass
class Example:
    split: str
    row: int  # index within the split (after --limit)
    id: str
    label: int | None
    input_ids: list[int]
    prompt_len: int
    subset: str | None = None  # the parent row's `subset` (ethics instruct), which picks its label words
    side: str | None = None  # the parent row's `side` (preferences sides: chosen / rejected); key (id, side)

    @property
    def completion_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class Plan:
    """The tokenized examples and their work units; identical for every shard of the same inputs."""

    parent: Version
    params: LogitCacheConfig
    ref: ModelRef  # the teacher, resolved once
    scheme: Scheme
    examples: list[Example]
    units: list[list[int]]  # example indices per unit, batches are consecutive runs of batch_size
    label_words: dict[int, str]
    label_token_ids: list[int]
    fingerprint: str
    vocab_size: int
    teacher_revision: str | None
    key: str
    pad_id: int
    notes: list[str] = field(default_factory=list)
    chat_template_sha256: str | None = None  # with --template chat: which chat template rendered the prompts
    # Per-subset label words (a parent whose subsets have their own words, e.g. ethics instruct): each row
    # stores the log-probs of ITS subset's words and their token ids; label_words / label_token_ids stay empty.
    label_words_by_subset: dict[str, dict[int, str]] = field(default_factory=dict)
    label_token_ids_by_subset: dict[str, list[int]] = field(default_factory=dict)
    sided: bool = False  # the parent has a side column: the cache keeps it
    at_ids: Version | None = None  # --at-ids: the cache whose kept ids this run scores at
    at_ids_rows: list[tuple[np.ndarray, np.ndarray]] | None = None  # per example: (ids [T, w], kept [T])

    @property
    def scored_label_ids(self) -> list[int]:
        """The token ids the teacher's answer position is scored at: the one word set, or every subset's."""
        if not self.label_token_ids_by_subset:
            return self.label_token_ids
        return sorted({i for ids in self.label_token_ids_by_subset.values() for i in ids})

    def row_label_ids(self, e: Example) -> list[int] | None:
        """The label token ids of one example (None: the single word set, or an unknown subset)."""
        return self.label_token_ids_by_subset.get(e.subset) if e.subset is not None else None

    @property
    def name(self) -> str:
        return self.params.name or f"{self.parent.name}-{self.params.config}-logits"

    def unit_path(self, work: Path, i: int) -> Path:
        return work / f"unit-{i:05d}.parquet"

    @cached_property
    def rerun_key(self) -> str | None:
        """What makes a stored version this run's result: the work-dir key (which leaves out the device: a
        rerun elsewhere is the same request), the file split (rows_per_file changes the files, not the
        units) and the teacher's files as they are now (a retrained folder keeps its name). None when the
        weights cannot be identified without loading them: such runs always compute."""
        weights = weights_identity(self.ref, self.teacher_revision)
        if weights is None:
            return None
        src = {"work_key": self.key, "rows_per_file": self.params.rows_per_file, "weights": weights}
        return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ShardReport:
    """What one `--shard i --num-shards n` run did (no version yet unless every unit is done)."""

    shard: int
    num_shards: int
    computed: int
    skipped: int
    done_units: int
    total_units: int
    work_dir: Path
    tokens: int = 0  # completion tokens scored (what the progress bar and the version's summary count)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = f", {self.tokens / self.seconds:,.0f} completion tokens/s" if self.seconds > 0 and self.tokens else ""
        return (f"shard {self.shard}/{self.num_shards}: computed {self.computed} units, {self.skipped} already "
                f"done{rate}; {self.done_units}/{self.total_units} units complete in {self.work_dir}")


# ---- planning ------------------------------------------------------------------------------------------
def read_parent(store: DatasetStore, params: LogitCacheConfig) -> tuple[Version, dict[str, pa.Table]]:
    parent = store.get(params.dataset)
    splits = params.splits or parent.splits(params.config)
    tables = {}
    for split in splits:
        t = parent.read(params.config, split)
        missing = [c for c in REQUIRED_COLUMNS if c not in t.column_names]
        if missing:
            hint = "; preference pairs are cached from the `sides` config (--config sides)" \
                if "sides" in parent.configs() and params.config != "sides" else ""
            raise CurateError(
                f"{parent.ref} config {params.config!r} lacks column(s) {', '.join(missing)} "
                f"(a logit cache needs {', '.join(REQUIRED_COLUMNS)}; has {', '.join(t.column_names)}){hint}"
            )
        if params.subsets or "subset" in t.column_names:
            from train.data import select_subsets

            t = select_subsets(t, params.subsets, f"{parent.ref} {params.config}/{split}")
            if params.limit and "subset" in t.column_names:  # --limit N: the first N rows of each subset
                from train.data import head_per_subset

                tables[split] = head_per_subset(t, params.limit)
                continue
        tables[split] = t.slice(0, params.limit) if params.limit else t
    return parent, tables


def resolve_label_words(tables: dict[str, pa.Table], params: LogitCacheConfig) -> dict[int, str]:
    """Explicit words win; otherwise the (label, label_text) pairs of the rows. Empty: not a classification set."""
    if params.label_words:
        return dict(sorted(params.label_words.items()))
    words: dict[int, str] = {}
    for split, t in tables.items():
        if "label" not in t.column_names or "label_text" not in t.column_names:
            return {}
        for i, (lab, text) in enumerate(zip(t["label"].to_pylist(), t["label_text"].to_pylist(), strict=True)):
            if lab is None:
                continue
            if words.setdefault(int(lab), text) != text:
                if "subset" in t.column_names:  # per-subset words (ethics instruct): token KD only
                    return {}
                raise CurateError(f"{split} row {i + 1}: label {lab} is {text!r} here but {words[int(lab)]!r} "
                                  "elsewhere; pass --label-words")
    return dict(sorted(words.items()))


def resolve_label_words_by_subset(tables: dict[str, pa.Table], params: LogitCacheConfig,
                                  declared: dict[str, dict[str, str]] | None = None) -> dict[str, dict[int, str]]:
    """Per-subset label words, for a parent whose subsets have their own words (ethics instruct): the parent
    manifest's ``label_words_by_subset`` (``declared``; a few rows may not show every label), checked against
    the rows' (label, label_text) pairs. Empty when the words are one set (`resolve_label_words`), given by
    --label-words, or the rows lack them."""
    if params.label_words or resolve_label_words(tables, params):
        return {}
    by: dict[str, dict[int, str]] = {s: {int(k): v for k, v in w.items()} for s, w in (declared or {}).items()}
    for split, t in tables.items():
        if not {"subset", "label", "label_text"} <= set(t.column_names):
            return {}
        rows = zip(t["subset"].to_pylist(), t["label"].to_pylist(), t["label_text"].to_pylist(), strict=True)
        for i, (subset, lab, text) in enumerate(rows):
            if lab is None or subset is None:
                continue
            words = by.setdefault(subset, {})
            if words.setdefault(int(lab), text) != text:
                raise CurateError(f"{split} row {i + 1}: {subset} label {lab} is {text!r} here but "
                                  f"{words[int(lab)]!r} elsewhere in {subset}")
    present = {s for t in tables.values() if "subset" in t.column_names for s in t["subset"].to_pylist()}
    by = {s: w for s, w in by.items() if s in present}
    sizes = {len(w) for w in by.values()}
    if len(sizes) > 1:  # label KD stacks rows into [N, C]: every subset needs the same number of words
        raise CurateError("subsets have different numbers of label words: "
                          + ", ".join(f"{s} {len(w)}" for s, w in sorted(by.items())))
    return {s: dict(sorted(w.items())) for s, w in sorted(by.items())}


def label_token_ids(tok: Any, words: dict[int, str], prefix: str, teacher: str) -> list[int]:
    """First token of prefix + word per label; refuse words the vocab cannot spell or that share a token."""
    out: dict[int, int] = {}
    for label, word in words.items():
        ids = tok(prefix + word, add_special_tokens=False).input_ids
        if not ids or (tok.unk_token_id is not None and tok.unk_token_id in ids):
            raise CurateError(f"label word {word!r} (label {label}) is not covered by the vocabulary of {teacher}: "
                              f"it tokenizes to {tok.convert_ids_to_tokens(ids)}")
        first = ids[0]
        for other, tid in out.items():
            if tid == first:
                raise CurateError(
                    f"label words {words[other]!r} and {word!r} share their first token "
                    f"{tok.convert_ids_to_tokens(first)!r} (id {first}): scoring by first token cannot tell them "
                    "apart; choose other --label-words or --label-prefix"
                )
        out[label] = first
    return [out[lab] for lab in words]


def tokenize_examples(tok: Any, tables: dict[str, pa.Table], params: LogitCacheConfig,
                      notes: list[str]) -> list[Example]:
    out = []
    truncated = 0
    for split, t in tables.items():
        labels = t["label"].to_pylist() if "label" in t.column_names else [None] * t.num_rows
        subsets = t["subset"].to_pylist() if "subset" in t.column_names else [None] * t.num_rows
        sides = t["side"].to_pylist() if "side" in t.column_names else [None] * t.num_rows
        for i, (ex_id, prompt, completion, label, subset, side) in enumerate(
            zip(t["id"].to_pylist(), t["prompt"].to_pylist(), t["completion"].to_pylist(), labels, subsets, sides,
                strict=True)
        ):
            where = f"{split} row {i + 1} (id {ex_id}{f', side {side}' if side is not None else ''})"
            if completion is None or not completion.strip():
                raise CurateError(f"{where}: empty completion; the cache scores completion tokens")
            if prompt is None:
                raise CurateError(f"{where}: prompt is null")
            p = prompt_token_ids(tok, prompt, params.template)
            c = list(tok(completion, add_special_tokens=False).input_ids)
            if not p:
                raise CurateError(f"{where}: the prompt tokenizes to nothing; the first completion token needs "
                                  "a preceding position")
            if params.max_length and len(p) + len(c) > params.max_length:
                if len(p) >= params.max_length:
                    raise CurateError(f"{where}: prompt alone is {len(p)} tokens >= --max-length {params.max_length}")
                c = c[: params.max_length - len(p)]
                truncated += 1
            out.append(Example(split, i, ex_id, None if label is None else int(label), p + c, len(p), subset,
                               side))
    if truncated:
        notes.append(f"{truncated} completions truncated to --max-length {params.max_length}")
    return out


def _at_ids_settings(store: DatasetStore, params: LogitCacheConfig,
                     notes: list[str]) -> tuple[LogitCacheConfig, Version]:
    """--at-ids: this run takes the other cache's row selection, tokenization and label settings (so its rows
    and input_ids can match exactly) and its width; a delta scheme becomes its plain counterpart (the rows are
    not sorted by this model's probability)."""
    other = store.get(params.at_ids or "")
    op = cache_params(other)
    words = {int(k): v for k, v in (op.get("label_words") or {}).items()} or None
    same = {"splits": op.get("splits"), "limit": op.get("limit"), "subsets": op.get("subsets"),
            "template": op.get("template", "plain"), "label_prefix": op.get("label_prefix", " "),
            "label_words": words, "max_length": op.get("max_length")}
    changed = [f"{k}={v!r}" for k, v in same.items() if getattr(params, k) != v]
    if changed:
        notes.append(f"--at-ids {other.ref}: its settings used: {', '.join(changed)}")
    scheme = params.quantization
    if scheme in PLAIN_SCHEME:
        notes.append(f"--at-ids rows are not sorted by this model's probability: --quantization {scheme} stored "
                     f"as {PLAIN_SCHEME[scheme]} (same step, no delta)")
        scheme = PLAIN_SCHEME[scheme]
    width = int(op.get("max_entries", op["k"]))
    return replace(params, **same, k=width, layout=LAYOUT, select="top", quantization=scheme), other


def _at_ids_rows(other: Version, examples: list[Example], fingerprint: str,
                 model: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per example, the other cache's kept ids ([T, w], padded) and counts ([T]); refuse a different tokenizer,
    a row the other cache lacks or holds with other input_ids (one line naming the row)."""
    op = cache_params(other)
    if op.get("tokenizer_fingerprint") != fingerprint:
        raise CurateError(f"--at-ids {other.ref} was made with another tokenizer ({op.get('tokenizer_fingerprint')}) "
                          f"than {model} ({fingerprint}): ids would not mean the same tokens")
    files = other.files(CACHE_CONFIG)
    wanted = [c for c in ("split", "id", "side", "input_ids", "prompt_len", "topk_ids")
              if c in pq.read_schema(files[0]).names]
    table = pa.concat_tables([pq.read_table(f, columns=wanted) for f in files])  # not the log-probs
    if table.num_rows != len(examples):
        raise CurateError(f"--at-ids {other.ref} has {table.num_rows} rows, this run {len(examples)}: not the same "
                          "rows")
    width = int(op.get("max_entries", op["k"]))
    sides = table["side"].to_pylist() if "side" in table.column_names else [None] * table.num_rows
    index = {key: i for i, key in enumerate(zip(table["split"].to_pylist(), table["id"].to_pylist(), sides,
                                                strict=True))}
    in_off, in_vals = _nested(table["input_ids"])
    plens = table["prompt_len"].to_numpy()
    tok_off, ids, _, lengths = _padded_entries(table["topk_ids"], width)
    out = []
    for e in examples:
        i = index.get((e.split, e.id, e.side))
        where = f"row id {e.id}" + (f" side {e.side}" if e.side is not None else "") + f" ({e.split})"
        if i is None:
            raise CurateError(f"--at-ids {other.ref} has no {where}")
        if int(plens[i]) != e.prompt_len or not np.array_equal(in_vals[in_off[i]:in_off[i + 1]], e.input_ids):
            raise CurateError(f"{where}: input_ids differ from --at-ids {other.ref}'s (tokenization or text "
                              "changed); cannot score at its ids")
        a, b = tok_off[i], tok_off[i + 1]
        out.append((ids[a:b].astype(np.int64), lengths[a:b].astype(np.int64)))
    return out


def make_units(examples: list[Example], chunk_size: int) -> list[list[int]]:
    """Longest first (ties in input order), cut into fixed units: padding stays small, the plan is stable."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    return [order[a: a + chunk_size] for a in range(0, len(order), chunk_size)]


def teacher_identity(ref: ModelRef) -> str | None:
    """A revision for the manifest: the GGUF file's sha256 for local files, else the hub commit when known."""
    if ref.gguf_file and (Path(ref.location) / ref.gguf_file).is_file():
        return "sha256:" + sha256_file(Path(ref.location) / ref.gguf_file)
    return None


def weights_identity(ref: ModelRef, revision: str | None) -> str | None:
    """The teacher's weights as files, without loading them: a local GGUF's sha256 (``revision``); a folder's
    file names, sizes and mtimes; a hub repo's commit as the hub resolves it now. None: unknown (an adapter
    folder, whose base lives elsewhere, or a hub that cannot be asked)."""
    if revision is not None:
        return revision
    folder = Path(ref.location)
    if folder.is_dir():
        if (folder / "adapter_config.json").is_file():
            return None
        return "files:" + hashlib.sha256(json.dumps(model_files_key(ref.location)).encode()).hexdigest()
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(ref.location, ref.gguf_file or "config.json", revision=ref.revision))
    except Exception:  # noqa: BLE001 - offline without a cached copy, a gated repo...: compute as usual
        return None
    snapshot = path.parents[len(Path(ref.gguf_file or "config.json").parts) - 1]
    return f"hub:{snapshot.name}" if snapshot.parent.name == "snapshots" else None


def stored_rerun(store: DatasetStore, plan: Plan) -> Version | None:
    """The stored version an identical earlier run wrote (the same `Plan.rerun_key`), if it is intact; a rerun
    then answers at once instead of running the teacher again. None: build as usual (which also repairs a
    damaged identical version, so damage is never reported as "unchanged")."""
    key = plan.rerun_key
    if key is None or plan.name not in store.names():
        return None
    try:
        versions = store.versions(plan.name)
    except CurateError:  # a damaged version of this name: leave it to the full path
        return None
    for v in reversed(versions):  # the latest such version, as an identical rebuild would find
        if v.manifest.get("params", {}).get("rerun_key") != key:
            continue
        try:
            for config in v.configs():
                v.files(config)  # listed files present, data matching the manifest (re-hashed when changed)
        except CurateError:
            return None
        return v
    return None


def plan_cache(store: DatasetStore, params: LogitCacheConfig, tok: Any | None = None) -> Plan:
    """Validate everything that can be checked without the model, tokenize, and cut the work into units."""
    params = validated(params)  # the same rules as command-line flags, for Python callers
    notes: list[str] = []
    other = None
    if params.at_ids is not None:
        params, other = _at_ids_settings(store, params, notes)
    scheme = get_scheme(params.quantization)
    parent, tables = read_parent(store, params)
    if other is not None:
        op = other.manifest.get("parents", [{}])[0]
        if (op.get("content_hash"), op.get("config")) != (parent.hash, params.config):
            raise CurateError(f"--at-ids {other.ref} was cached from {op.get('name')}@{op.get('tag')} config "
                              f"{op.get('config')!r} ({str(op.get('content_hash'))[:12]}), not this run's parent "
                              f"{parent.ref} config {params.config!r} ({parent.hash[:12]})")
    ref = params.model_ref()
    tok = tok if tok is not None else load_tokenizer(ref)
    vocab = len(tok)
    if params.k > vocab:
        raise CurateError(f"--k {params.k} is larger than the teacher's vocabulary ({vocab:,} tokens)")
    words = resolve_label_words(tables, params)
    label_ids = label_token_ids(tok, words, params.label_prefix, ref.describe()) if words else []
    words_by_subset = resolve_label_words_by_subset(tables, params,
                                                    parent.manifest.get("params", {}).get("label_words_by_subset"))
    ids_by_subset = {s: label_token_ids(tok, w, params.label_prefix, f"{ref.describe()} ({s})")
                     for s, w in words_by_subset.items()}
    examples = tokenize_examples(tok, tables, params, notes)
    if not examples:
        raise CurateError(f"{parent.ref} config {params.config!r} has no rows to cache")
    fingerprint = tokenizer_fingerprint(tok)
    at_rows = _at_ids_rows(other, examples, fingerprint, ref.describe()) if other is not None else None
    revision = teacher_identity(ref)
    chat = getattr(tok, "chat_template", None) if params.template == "chat" else None
    chat_sha = hashlib.sha256(chat.encode()).hexdigest() if isinstance(chat, str) else None
    key_src = {
        **({"at_ids": other.hash} if other is not None else {}),
        "parent": parent.hash, "builder": BUILDER_VERSION, "revision": revision, "fingerprint": fingerprint,
        "scheme": scheme.name, "chat_template": chat_sha, **_key_params(params),
        **({"row_labels": True} if ids_by_subset else {}),  # units with per-row label ids (absent: keys as before)
        # sampled draws are seeded per example and row block since tail draws came in: units drawn the earlier
        # way are not resumed into a new run (each was valid, but the mix would match no fresh build)
        **({"sample_seeding": 2} if params.select == "sample" else {}),
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    plan = Plan(parent, params, ref, scheme, examples, make_units(examples, params.chunk_size), words, label_ids,
                fingerprint, vocab, revision, key, int(pad_id), notes, chat_sha, words_by_subset, ids_by_subset,
                sided=any("side" in t.column_names for t in tables.values()), at_ids=other, at_ids_rows=at_rows)
    labelled = [(e, label_ids[list(words).index(e.label)]) for e in examples if e.label in words]
    labelled += [(e, ids_by_subset[e.subset][list(words_by_subset[e.subset]).index(e.label)]) for e in examples
                 if e.subset in words_by_subset and e.label in words_by_subset[e.subset]]
    agree = sum(e.input_ids[e.prompt_len] == gold for e, gold in labelled)
    if agree < len(labelled):
        notes.append(f"first completion token is the gold label's token in {agree}/{len(labelled)} rows "
                     f"(check --label-prefix {params.label_prefix!r})")
    return plan


def _key_params(params: LogitCacheConfig) -> dict[str, Any]:
    """The config's part of the work-dir key, spelled as before `teacher` became the shared `model` field
    (and before `revision` existed), so unfinished work from earlier runs is still found."""
    d = {k: v for k, v in asdict(params).items() if k not in NOT_IN_KEY}
    if d.get("subsets") is None:  # added later: absent from earlier keys
        d.pop("subsets", None)
    d.pop("at_ids", None)  # added later; the other cache's content hash is in the key instead
    if not d.get("tail_samples"):  # added later: absent from earlier keys
        d.pop("tail_samples", None)
    d["teacher"] = d.pop("model")
    if d["revision"] is None:
        del d["revision"]
    else:
        d["model_revision"] = d.pop("revision")
    return d


# ---- computing units ------------------------------------------------------------------------------------
def unit_table(plan: Plan, unit: list[int], scored: list[Any]) -> pa.Table:
    scheme = plan.scheme
    p = plan.params
    schema = cache_schema(plan.vocab_size, scheme, layout=p.layout, sampled=p.select == "sample",
                          tempered=p.proposal_temperature != 1.0, row_labels=bool(plan.label_token_ids_by_subset),
                          sided=plan.sided, tail=bool(p.tail_samples))
    exs = [plan.examples[i] for i in unit]
    lab_type = schema.field("label_logprobs").type
    codes = [encode_logprobs(s.topk_logprobs, scheme) for s in scored]
    cols: dict[str, pa.Array] = {
        "id": pa.array([e.id for e in exs], pa.string()),
        **({"side": pa.array([e.side for e in exs], pa.string())} if plan.sided else {}),
        "split": pa.array([e.split for e in exs], pa.string()),
        "label": pa.array([e.label for e in exs], pa.int8()),
        "input_ids": pa.array([e.input_ids for e in exs], schema.field("input_ids").type),
        "prompt_len": pa.array([e.prompt_len for e in exs], pa.int32()),
    }
    if p.layout == 1:
        cols["topk_ids"] = _list_of_lists([s.topk_ids for s in scored], schema.field("topk_ids").type)
        cols["topk_logprobs"] = _list_of_lists(codes, schema.field("topk_logprobs").type)
    else:
        masks = [_kept_mask(s) for s in scored]
        cols["topk_ids"] = _ragged([s.topk_ids for s in scored], masks, schema.field("topk_ids").type)
        cols["topk_logprobs"] = _ragged(codes, masks, schema.field("topk_logprobs").type)
        if p.select == "sample":
            cols["sample_counts"] = _ragged([s.sample_counts for s in scored], masks,
                                            schema.field("sample_counts").type)
            if p.proposal_temperature != 1.0:
                cols["sample_log_weights"] = _ragged([s.sample_log_weights for s in scored], masks,
                                                     schema.field("sample_log_weights").type)
    if p.tail_samples:  # ids only (see the codec); a token whose tail has no mass keeps no draws
        cols["tail_ids"] = _ragged([s.tail_ids for s in scored], [np.isfinite(s.tail_logprobs) for s in scored],
                                   schema.field("tail_ids").type)
    cols["residual"] = _lists([s.residual.astype(np.float16) for s in scored], pa.float16())
    cols["entropy"] = _lists([s.entropy.astype(np.float16) for s in scored], pa.float16())
    if plan.label_token_ids_by_subset:  # each row keeps its own subset's words, scored among every subset's
        col = {tid: j for j, tid in enumerate(plan.scored_label_ids)}
        row_ids = [plan.row_label_ids(e) for e in exs]
        cols["label_logprobs"] = pa.array(
            [s.label_logprobs[[col[i] for i in ids]].tolist() if ids and s.label_logprobs is not None else None
             for s, ids in zip(scored, row_ids, strict=True)], lab_type)
        cols["label_token_ids"] = pa.array(row_ids, schema.field("label_token_ids").type)
    else:
        cols["label_logprobs"] = pa.array(
            [s.label_logprobs.tolist() if s.label_logprobs is not None else None for s in scored], lab_type)
    table = pa.table(cols, schema=schema)
    return table.append_column("_row", pa.array([e.row for e in exs], pa.int32()))


def _kept_mask(s: Any) -> np.ndarray:
    """[T, k] True on the entries a token keeps (a prefix of its row)."""
    t, k = s.topk_ids.shape
    if s.kept is None:
        return np.ones((t, k), dtype=bool)
    return np.arange(k)[None, :] < s.kept[:, None]


def _ragged(arrays: list[np.ndarray], masks: list[np.ndarray], typ: pa.ListType) -> pa.Array:
    """[T_i, k] arrays keeping the masked prefix of each row -> list<list<v>> with variable inner lengths."""
    inner_type = typ.value_type.value_type
    lengths = np.concatenate([m.sum(1) for m in masks]) if masks else np.zeros(0, np.int64)
    flat = np.concatenate([a[m] for a, m in zip(arrays, masks, strict=True)]) if arrays else np.zeros(0)
    inner_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_off, pa.int32()),
                                     pa.array(flat.astype(inner_type.to_pandas_dtype()), inner_type))
    outer = np.concatenate([[0], np.cumsum([m.shape[0] for m in masks])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer, pa.int32()), inner)


def _lists(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    values = pa.array(np.concatenate(arrays) if arrays else np.zeros(0), value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _list_of_lists(arrays: list[np.ndarray], typ: pa.ListType) -> pa.Array:
    """[T_i, k] arrays -> list<list<v>> without going through Python objects."""
    inner_type = typ.value_type.value_type
    k = arrays[0].shape[1] if arrays else 0
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    rows = sum(a.shape[0] for a in arrays)
    inner = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * k, pa.int32()),
                                     pa.array(flat.astype(inner_type.to_pandas_dtype()), inner_type))
    outer = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer, pa.int32()), inner)


def write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def compute_units(plan: Plan, work: Path, get_model: Callable[[], Any], *, shard: int = 0, num_shards: int = 1,
                  max_units: int | None = None, progress: bool = True) -> ShardReport:
    """Compute this shard's missing units; `get_model` is only called when one is missing."""
    from curate.teacher_scoring import score_at_ids, score_batch

    mine = [i for i in range(len(plan.units)) if i % num_shards == shard]
    for stale in work.glob(".unit-*.tmp-*"):
        if int(stale.name[len(".unit-"):].split(".")[0]) in mine:
            stale.unlink(missing_ok=True)  # half-written by a killed run of this shard
    todo = [i for i in mine if not plan.unit_path(work, i).is_file()]
    report = ShardReport(shard, num_shards, 0, len(mine) - len(todo), 0, len(plan.units), work)
    if max_units is not None:
        todo = todo[:max_units]
    model = get_model() if todo else None
    bs = plan.params.batch_size
    t0 = time.perf_counter()
    with _progress(progress) as bar:
        total_tokens = sum(plan.examples[j].completion_tokens for i in todo for j in plan.units[i])
        task = bar.add_task(f"{plan.name} shard {shard}/{num_shards}", total=total_tokens, rate="")
        for i in todo:
            unit = plan.units[i]
            scored = []
            for a in range(0, len(unit), bs):
                batch = [plan.examples[j] for j in unit[a: a + bs]]
                if plan.at_ids_rows is not None:
                    rows = [plan.at_ids_rows[j] for j in unit[a: a + bs]]
                    scored += score_at_ids(model, [e.input_ids for e in batch], [e.prompt_len for e in batch],
                                           [r[0] for r in rows], [r[1] for r in rows], pad_id=plan.pad_id,
                                           label_token_ids=plan.scored_label_ids or None)
                else:
                    scored += score_batch(model, [e.input_ids for e in batch], [e.prompt_len for e in batch],
                                          k=plan.params.k, pad_id=plan.pad_id,
                                          label_token_ids=plan.scored_label_ids or None, top_p=plan.params.top_p,
                                          k_min=plan.params.k_min, entry_cost=plan.params.entry_cost,
                                          samples=plan.params.samples if plan.params.select == "sample" else None,
                                          proposal_temperature=plan.params.proposal_temperature,
                                          tail_samples=plan.params.tail_samples)
                n = sum(e.completion_tokens for e in batch)
                report.tokens += n
                rate = report.tokens / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=n, rate=f"{rate:,.0f} tok/s")
            write_atomic(unit_table(plan, unit, scored), plan.unit_path(work, i))
            report.computed += 1
    report.seconds = time.perf_counter() - t0
    report.done_units = sum(plan.unit_path(work, i).is_file() for i in range(len(plan.units)))
    return report


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("completion tokens"),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), disable=not enabled)


# ---- merging ---------------------------------------------------------------------------------------------
def merge_units(store: DatasetStore, plan: Plan, work: Path, *, teacher: dict[str, Any],
                quant_mode: str) -> BuildResult:
    """Every unit present: rows back in parent order, one version, scratch removed."""
    missing = [i for i in range(len(plan.units)) if not plan.unit_path(work, i).is_file()]
    if missing:
        raise CurateError(f"cannot merge: {len(missing)} of {len(plan.units)} units missing in {work} "
                          f"(first: unit {missing[0]}); run the remaining shards first")
    table = pa.concat_tables([pq.read_table(plan.unit_path(work, i)) for i in range(len(plan.units))])
    p = plan.params
    scheme, ref = plan.scheme, plan.ref
    split_order = list(dict.fromkeys(e.split for e in plan.examples))
    tokens = sum(e.completion_tokens for e in plan.examples)
    words_by_subset = {s: {str(k): v for k, v in w.items()} for s, w in plan.label_words_by_subset.items()}
    params: dict[str, Any] = {
        "teacher": p.model,
        "teacher_location": ref.describe(),
        "teacher_revision": teacher["revision"],
        "tokenizer_fingerprint": plan.fingerprint,
        "vocab_size": plan.vocab_size,
        "k": p.k,
        "layout": p.layout,
        "select": p.select,
        "top_p": p.top_p,
        "k_min": p.k_min,
        "entry_cost": p.entry_cost,
        "samples": p.samples if p.select == "sample" else None,
        "proposal_temperature": p.proposal_temperature if p.select == "sample" else None,
        "tail_samples": p.tail_samples,
        "max_entries": p.max_entries,
        "preset": p.preset,
        "quantization": scheme.name,
        "quantization_detail": scheme.describe(),
        "id_type": str(cache_schema(plan.vocab_size, scheme).field("input_ids").type.value_type),
        "dtype": teacher["dtype"],
        "load_in": quant_mode,
        "template": p.template,
        "template_rule": TEMPLATES[p.template],
        "chat_template_sha256": plan.chat_template_sha256,
        "label_words": {str(k): v for k, v in plan.label_words.items()},
        "label_token_ids": plan.label_token_ids,
        **({"label_words_by_subset": words_by_subset,
            "label_token_ids_by_subset": plan.label_token_ids_by_subset,
            "label_ids_per_row": "column label_token_ids: the row's subset's words; label_logprobs in that order"}
           if plan.label_token_ids_by_subset else {}),
        "label_prefix": p.label_prefix,
        "label_scoring": "first token of label_prefix + word; labels sharing a first token are refused",
        "answer_position": ANSWER_POSITION,
        "temperature": 1.0,
        "stored_values": "raw log-probs (temperature 1); apply any KD temperature in the loss",
        "parent_config": p.config,
        "splits": split_order,
        "max_length": p.max_length,
        "limit": p.limit,
        **({"subsets": p.subsets} if p.subsets else {}),
        "batch_size": p.batch_size,
        "chunk_size": p.chunk_size,
        "completion_tokens": tokens,
        **({"sides": True} if plan.sided else {}),
        # lets an identical rerun answer "unchanged" without the teacher (`stored_rerun`); only when every unit
        # came from the teacher's files (not a model object a caller passed in, which they cannot vouch for)
        "rerun_key": plan.rerun_key if teacher.get("from_files") else None,
    }
    parents = [{"name": plan.parent.name, "tag": plan.parent.tag, "content_hash": plan.parent.hash,
                "config": p.config}]
    if plan.at_ids is not None:
        o = plan.at_ids
        params["select"] = "at-ids"
        params["at_ids"] = {"name": o.name, "tag": o.tag, "content_hash": o.hash}
        params["at_ids_rule"] = ("topk_ids are exactly the other cache's kept ids (its order, not this model's); "
                                 "topk_logprobs this model's full log-softmax at them; residual = 1 - their mass")
        parents.append({"name": o.name, "tag": o.tag, "content_hash": o.hash, "config": CACHE_CONFIG,
                        "role": "at_ids"})
    gguf = Path(ref.location) / ref.gguf_file if ref.gguf_file else None
    sources = [SourceFile.from_path(gguf)] if gguf and gguf.is_file() else []
    card: dict[str, Any] = {
        "pretty_name": f"Teacher logits of {ref.describe().rsplit('/', 1)[-1]} on {plan.parent.ref} "
                       f"[{p.config}]",
        "description": (
            f"Sparse teacher distributions for offline knowledge distillation: per completion token {_kept_words(p)} "
            f"token ids and log-probs ({scheme.name}), "
            + (f"the ids of {p.tail_samples} draws from the teacher outside them, " if p.tail_samples else "")
            + "the residual probability mass outside them and the entropy; per example the teacher's log-probs "
            "of the label words at the answer position. Read it with `curate.logit_codec.iter_cache`."
        ),
        "license": plan.parent.manifest.get("card", {}).get("license"),
        "task_categories": ["text-generation"],
        "tags": ["knowledge-distillation", "teacher-logits", plan.parent.name],
        "default_config": CACHE_CONFIG,
        "label_mapping": ({str(k): v for k, v in plan.label_words.items()}
                          or words_by_subset or None),
        "config_notes": {CACHE_CONFIG: "one row per example; see curate/logit_codec.py for the columns"},
        "build_notes": "\n".join([f"- {tokens:,} completion tokens (bytes per token: `bytes_per_token` in "
                                  "manifest.json, all columns, parquet + zstd)"] + [f"- {n}" for n in plan.notes]),
    }
    with store.new_version(plan.name, builder="teacher-logits", builder_version=BUILDER_VERSION, params=params,
                           sources=sources, parents=parents, card=card) as w:
        for split in split_order:
            rows = table.filter(pa.compute.equal(table["split"], split))
            rows = rows.take(pa.compute.sort_indices(rows["_row"])).drop_columns(["_row"])
            w.write_table(CACHE_CONFIG, split, rows, rows_per_shard=p.rows_per_file)
        size = sum(f.stat().st_size for f in w.tmp.rglob("*.parquet"))
        w.add_params({"bytes": size, "bytes_per_token": round(size / max(tokens, 1), 2)})  # known once written
    result = BuildResult(w.result.version, w.result.created, list(plan.notes), repaired=w.result.repaired)
    _remove_work(work)
    return result


def _kept_words(p: LogitCacheConfig) -> str:
    if p.at_ids is not None:
        return f"exactly the kept ids of {p.at_ids} (scored at them)"
    if p.select == "sample":
        tempered = "" if p.proposal_temperature == 1.0 else f" at temperature {p.proposal_temperature}"
        return f"the distinct ids of {p.samples} draws from the teacher{tempered} (with their counts),"
    if p.entry_cost is not None:
        return f"the top ids (between {p.k_min} and {p.k}) minimising KL + {p.entry_cost} nats per entry,"
    if p.top_p is not None:
        return f"the fewest top ids reaching mass {p.top_p} ({p.k_min} to {p.k}),"
    return f"the top-{p.k}"


def _remove_work(work: Path) -> None:
    for f in work.iterdir():
        f.unlink(missing_ok=True)
    work.rmdir()


# ---- entry point -----------------------------------------------------------------------------------------
def cache_teacher_logits(store: DatasetStore, params: LogitCacheConfig, *, shard: int = 0, num_shards: int = 1,
                         merge: bool = True, merge_only: bool = False, max_units: int | None = None,
                         progress: bool = True, model: Any = None, tokenizer: Any = None) -> BuildResult | ShardReport:
    """Plan, compute this shard's missing units, and (when every unit exists and `merge`) write the version.

    Returns the `BuildResult` of the merged version, or a `ShardReport` while units are still missing.
    ``model`` / ``tokenizer`` let a caller that already holds the teacher (tests, benchmarks) skip loading.
    """
    if not 0 <= shard < num_shards:
        raise CurateError(f"--shard must be in [0, {num_shards}), got {shard}")
    quant = params.weight_quantization(strict=True)  # a cache never silently holds a full-precision teacher's logits
    plan = plan_cache(store, params, tokenizer)
    if model is None:  # the teacher is the files named by params, which the rerun key identifies
        stored = stored_rerun(store, plan)
        if stored is not None:
            return BuildResult(stored, created=False, notes=list(plan.notes))
    work = store.work_dir(plan.name, plan.key)
    _write_plan_file(work, plan)

    def load() -> Any:
        m = load_causal_lm(plan.ref, dtype=params.dtype, device=params.device, quant=quant)
        m.eval()
        head = m.get_output_embeddings()
        if head is not None and params.k > head.weight.shape[0]:
            raise CurateError(f"--k {params.k} is larger than the teacher's output vocabulary "
                              f"({head.weight.shape[0]:,})")
        return m

    def get_model() -> Any:
        m = model if model is not None else load()
        _record_teacher(work, m, plan.teacher_revision, from_files=model is None)
        return m

    report = None
    if not merge_only:
        try:
            report = compute_units(plan, work, get_model, shard=shard, num_shards=num_shards, max_units=max_units,
                                   progress=progress)
        except BaseException:
            if not any(work.glob("unit-*.parquet")):
                _remove_work(work)  # failed before any progress (e.g. the model would not load): leave no trace
            raise
    complete = all(plan.unit_path(work, i).is_file() for i in range(len(plan.units)))
    if merge_only or (merge and complete):
        return merge_units(store, plan, work, teacher=_recorded_teacher(work, params.dtype, plan.teacher_revision),
                           quant_mode=quant.mode)
    assert report is not None
    return report


def _record_teacher(work: Path, model: Any, revision: str | None, *, from_files: bool) -> None:
    """What the teacher actually ran as (``auto`` dtype resolves per checkpoint; hub models know their commit),
    kept beside the units so a later ``--merge`` process records it too. ``from_files``: loaded from the
    files params name (not passed in); stays False once any process of this work dir got a model object."""
    path = work / "teacher.json"
    # an earlier process's record: a model it was handed taints the work dir (a record without the field: too)
    earlier = json.loads(path.read_text()).get("from_files", False) if path.is_file() else True
    info = {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "revision": revision or getattr(getattr(model, "config", None), "_commit_hash", None),
        "from_files": from_files and earlier,
    }
    tmp = work / f".teacher.json.tmp-{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, work / "teacher.json")


def _recorded_teacher(work: Path, dtype: str, revision: str | None) -> dict[str, Any]:
    path = work / "teacher.json"
    return json.loads(path.read_text()) if path.is_file() else {"dtype": dtype, "revision": revision}


def _write_plan_file(work: Path, plan: Plan) -> None:
    """Human-readable record of what the units in this folder are."""
    path = work / "plan.json"
    if path.is_file():
        return
    info = {"name": plan.name, "parent": plan.parent.ref, "units": len(plan.units),
            "examples": len(plan.examples), "params": asdict(plan.params)}
    tmp = work / f".plan.json.tmp-{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp, path)
