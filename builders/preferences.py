"""Preference pairs (prompt, chosen, rejected) for DPO teachers and preference distillation (DCKD / ADPA).

Configs written (one store split per data split):
- ``pairs``: id, prompt, chosen, rejected, split, source, label, rejected_source.
- ``sides``: the same pairs long: id, side ("chosen" | "rejected"), prompt, completion, split; the chosen row
  first, then the rejected row, per pair. This is what `curate cache-logits --config sides` reads.

Sources:
- ``--from dfar[@tag]`` (a DFAR store version; parent in the lineage). chosen = the gold completion of
  ``--config`` (``lr``: " <label>. Reason: <reason>"). rejected comes from ``--rejected``:
  ``model:<spec>``: local greedy generation (any model spec, or a run folder). Recipe: input = the prompt's
  ids (``--template``) followed by the ids of the completion template's text before ``{reason}`` with the
  OPPOSITE label word, trailing spaces removed (" unethical. Reason:"); the model continues; reason = the first
  non-empty line of the continuation, stripped; rejected = the completion template filled with the opposite
  label and that reason.
  ``openai:<model>``: one chat call per row through `curate.llm.LLMClient` (temperature 0, cached in
  ``<store>/llm_cache``), user message ``--openai-prompt`` asking for a reason for the opposite label;
  reason = the whole reply, whitespace collapsed; rejected as above.
  ``student:<run folder>``: one greedy generation per prompt from that run's model (merged or adapter run,
  `train.modeling.load_run`), its label parsed as `curate eval` parses it (`train.scoring.parse_generation`);
  the row is kept only when that label is wrong (its generated text, trailing spaces removed, is the rejected
  side); right and unparsed answers are dropped and counted in the manifest.
  Local generations are resumable: each chunk of ``--batch-size`` rows is appended to a JSONL file in the
  store's work dir (keyed by the model's files and the recipe) before the next starts; a rerun reuses it.
  Empty reasons (and unusable API replies: cut, refused, empty) drop the row, counted; they are not cached.
- ``--source <file or hub id>`` in the common prompt/chosen/rejected layout, loaded with `datasets` (.jsonl /
  .json / .parquet / .csv by extension; anything else is a Hub dataset id). chosen / rejected are strings or
  chat-message lists ``[{role, content}, ...]``: the response is the LAST message (it must be the assistant's).
  The prompt is the ``prompt`` column when there is one (a string, or a message list rendered as below), else
  the messages before the response (chosen's and rejected's must agree). Rendering: a lone user message is its
  content; otherwise each message becomes "<Role>: <content>", joined by blank lines, ending "\\n\\nAssistant:".
  Splits: a ``split`` column if present; else a Hub dataset's own splits; else ``--test-fraction`` (a seeded,
  per-prompt hash draw) or every row in ``--split`` (default train).

Ids: a source ``id`` column is kept when present and unique, else sha256 of prompt/chosen/rejected (16 hex).
Prompts found in both train and test are dropped from train and counted, as the dfar builder does.
Bad input (missing column, wrong type, empty side, identical chosen and rejected) is one line naming file and row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
import pyarrow as pa

from builders.base import BuildResult
from curate.configs import ConfigError, opt
from curate.errors import CurateError, InputError
from curate.store import DatasetStore, SourceFile, Version
from curate.urls import redact_url

log = logging.getLogger(__name__)

BUILDER_VERSION = "1.0.0"
SIDES = ("chosen", "rejected")
REJECTED_KINDS = ("model", "openai", "student")
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEMPLATE_FIELDS = ("statement", "label", "label_text", "reason", "id")
DEFAULT_OPENAI_PROMPT = (
    "Statement: {statement}\nWrite one or two sentences giving a reason why this statement is {label_text}. "
    "Reply with the reason only."
)
MAX_NOTES = 20

PAIRS_SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
     ("split", pa.string()), ("source", pa.string()), ("label", pa.int8()), ("rejected_source", pa.string())]
)
SIDES_SCHEMA = pa.schema(
    [("id", pa.string()), ("side", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
     ("split", pa.string())]
)


@dataclass
class PreferencesConfig:
    """Everything that shapes the pairs; recorded verbatim in the manifest (endpoints redacted)."""

    from_dataset: str | None = opt(None, "DFAR store version (name or name@tag) to build pairs from.",
                                   flags=("--from",))
    source: str | None = opt(None, "Instead of --from: a .jsonl/.json/.parquet/.csv file or a Hub dataset id in "
                                   "the prompt/chosen/rejected layout (strings or chat-message lists).")
    rejected: str | None = opt(None, "With --from: model:<hub id|folder|.gguf|smollm2|run>, openai:<model> or "
                                     "student:<run folder> (kept only where its label is wrong).")
    config: str = opt("lr", "Config of the --from version whose completion is the chosen side.")
    split: str | None = opt(None, "--from: comma-separated splits (default all). --source without a split "
                                  "column: the split name of every row (default train).")
    test_fraction: Annotated[float, at.Gt(0), at.Lt(1)] | None = opt(
        None, "--source without a split column: hold out this seeded fraction of prompts as test.")
    seed: int = opt(0, "Seed of the --test-fraction draw.")
    source_config: str | None = opt(None, "Hub dataset config name (--source with a Hub id).")
    limit: Annotated[int, at.Ge(1)] | None = opt(None, "Only the first N rows of each split (quick runs).")
    template: Literal["plain", "chat"] | None = opt(
        None, "How a local model sees the prompt: plain or chat (default: a student run's own, else plain).")
    max_new_tokens: Annotated[int, at.Ge(1)] = opt(96, "Longest generated answer (local models and API calls).")
    batch_size: Annotated[int, at.Ge(1)] = opt(8, "Prompts per local generation batch (one resumable chunk).")
    device: str = opt("auto", "Local models: auto, cpu, cuda ...")
    base_url: str | None = opt(None, "openai: endpoint (default $OPENAI_BASE_URL, else OpenAI).")
    concurrency: Annotated[int, at.Ge(1)] = opt(8, "openai: requests in flight.")
    openai_prompt: str = opt(DEFAULT_OPENAI_PROMPT, "openai: user message; fields {statement}, {label_text}, "
                                                    "{prompt}.")
    name: str = opt("preferences", "Dataset name in the store.")

    def validate(self) -> None:
        if (self.from_dataset is None) == (self.source is None):
            raise ConfigError("from_dataset", "give exactly one of --from (a DFAR version) and --source (a file "
                                              "or Hub dataset)")
        if self.from_dataset is not None:
            if not self.rejected:
                raise ConfigError("rejected", "--from needs --rejected model:<spec>, openai:<model> or "
                                              "student:<run folder>")
            kind, _, what = self.rejected.partition(":")
            if kind not in REJECTED_KINDS or not what:
                raise ConfigError("rejected", f"--rejected must be model:<spec>, openai:<model> or "
                                              f"student:<run folder>, not {self.rejected!r}")
            if self.test_fraction is not None:
                raise ConfigError("test_fraction", "--test-fraction is for --source; --from keeps its splits")
        else:
            if self.rejected:
                raise ConfigError("rejected", "--rejected is for --from; a --source file has its own rejected")
            if self.test_fraction is not None and self.split is not None:
                raise ConfigError("test_fraction", "give --split (one name for every row) or --test-fraction, "
                                                   "not both")


@dataclass
class _Pair:
    id: str | None
    prompt: str
    chosen: str
    rejected: str
    split: str
    label: int | None = None
    where: str = ""  # "file, row N" for messages


@dataclass
class _Counts:
    """What the build dropped or kept, per reason; lands in the manifest params and the card."""

    dropped: Counter[str] = field(default_factory=Counter)
    kept: int = 0
    notes: list[str] = field(default_factory=list)


def content_id(prompt: str, chosen: str, rejected: str) -> str:
    return hashlib.sha256("\0".join((prompt, chosen, rejected)).encode()).hexdigest()[:16]


# ---- rendering chat messages ------------------------------------------------------------------------------
def _messages(value: Any, where: str, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise CurateError(f"{where}: {what} must be a string or a non-empty list of {{role, content}} messages, "
                          f"not {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise CurateError(f"{where}: {what} message {i} is not a {{role: str, content: str}} object")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_messages(messages: list[dict[str, str]]) -> str:
    """A lone user message is its content; else "<Role>: <content>" blocks and a closing "Assistant:" cue."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    blocks = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(blocks) + "\n\nAssistant:"


def _response(value: Any, where: str, what: str) -> tuple[str, list[dict[str, str]] | None]:
    """(response text, the messages before it or None for a plain string)."""
    if value is None:  # a blank CSV cell or a JSON null
        raise CurateError(f"{where}: empty {what}")
    if isinstance(value, str):
        return value, None
    msgs = _messages(value, where, what)
    if msgs[-1]["role"] != "assistant":
        raise CurateError(f"{where}: the last {what} message is {msgs[-1]['role']!r}, not the assistant's response")
    return msgs[-1]["content"], msgs[:-1]


def record_to_pair(rec: dict[str, Any], where: str, split: str) -> _Pair:
    """One source record as a pair, checked: types, empty sides, identical sides, agreeing conversations."""
    chosen, c_ctx = _response(rec.get("chosen"), where, "chosen")
    rejected, r_ctx = _response(rec.get("rejected"), where, "rejected")
    if c_ctx is not None and r_ctx is not None and c_ctx != r_ctx:
        raise CurateError(f"{where}: chosen and rejected continue different conversations")
    prompt_value = rec.get("prompt")
    if prompt_value is None:
        context = c_ctx if c_ctx is not None else r_ctx
        if not context:
            raise CurateError(f"{where}: no prompt: no prompt column and no messages before the responses")
        prompt = render_messages(context)
    elif isinstance(prompt_value, str):
        prompt = prompt_value
    else:
        prompt = render_messages(_messages(prompt_value, where, "prompt"))
    for what, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise CurateError(f"{where}: empty {what}")
    if chosen == rejected:
        raise CurateError(f"{where}: chosen and rejected are identical")
    rid = rec.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise CurateError(f"{where}: id must be a string or an integer, not {type(rid).__name__}")
    row_split = rec.get("split")
    if row_split is not None:
        if not isinstance(row_split, str) or not row_split.strip():
            raise CurateError(f"{where}: split must be a non-empty string")
        split = row_split.strip()
    return _Pair(None if rid is None else str(rid), prompt, chosen, rejected, split, where=where)


# ---- loading a source file or Hub dataset -------------------------------------------------------------------
def _row_name(path: str, fmt: str | None, i: int) -> str:
    """The file and 1-based row of record i (a CSV's header is row 1, as everywhere in the toolkit)."""
    return f"{path}, row {i + 2 if fmt == 'csv' else i + 1}"


def _diagnose_jsonl(path: Path, error: str) -> CurateError:
    """`datasets` refuses a JSON Lines file whose rows disagree on types without naming the row; find it."""
    types: dict[str, tuple[str, int]] = {}
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                return InputError(path, f"not JSON: {e.msg}", row=i + 1)
            if not isinstance(rec, dict):
                return InputError(path, f"a JSON object per line expected, not {type(rec).__name__}", row=i + 1)
            for key in ("prompt", "chosen", "rejected"):
                if key in rec and rec[key] is not None:
                    kind = "string" if isinstance(rec[key], str) else type(rec[key]).__name__
                    first = types.setdefault(key, (kind, i + 1))
                    if first[0] != kind:
                        return InputError(path, f"{key} is a {kind} here but a {first[0]} in row {first[1]}",
                                          row=i + 1)
    return CurateError(f"{path}: could not be read as JSON Lines: {error.splitlines()[0][:200]}")


def load_source(params: PreferencesConfig) -> tuple[dict[str, list[_Pair]], list[SourceFile], str]:
    """Pairs per split from the --source file or Hub dataset, every row checked; (pairs, sources, label)."""
    import datasets

    spec = str(params.source)
    path = Path(spec).expanduser()
    fmt = FILE_FORMATS.get(path.suffix.lower())
    datasets.disable_progress_bars()
    if fmt is not None or path.exists():
        if not path.is_file():
            raise CurateError(f"--source {spec}: no such file")
        if fmt is None:
            raise CurateError(f"--source {spec}: unknown file type {path.suffix!r} (use {', '.join(FILE_FORMATS)})")
        try:
            loaded = {"": datasets.load_dataset(fmt, data_files=str(path), split="train")}
        except Exception as e:  # datasets wraps Arrow / JSON errors in several types  # noqa: BLE001
            if path.suffix.lower() == ".jsonl":
                raise _diagnose_jsonl(path, str(e)) from None
            raise CurateError(f"{path}: could not be read as {fmt}: {str(e).splitlines()[0][:200]}") from None
        sources = [SourceFile.from_path(path)]
        label = path.name
    else:
        try:
            dd = datasets.load_dataset(spec, params.source_config)
        except Exception as e:  # noqa: BLE001  # offline, unknown id, gated...: one line
            raise CurateError(f"--source {spec}: not a file here, and the Hub dataset could not be loaded: "
                              f"{str(e).splitlines()[0][:200]}") from None
        loaded = dict(dd)
        fp = hashlib.sha256(json.dumps({k: d._fingerprint for k, d in loaded.items()}, sort_keys=True).encode())
        sources = [SourceFile(f"hf://datasets/{spec}" + (f"/{params.source_config}" if params.source_config else ""),
                              fp.hexdigest(), sum(d.data.nbytes for d in loaded.values()))]
        label = spec
    out: dict[str, list[_Pair]] = {}
    for hub_split, ds in loaded.items():
        missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
        if missing:
            raise InputError(path if hub_split == "" else f"{spec} ({hub_split})",
                             f"missing column(s) {', '.join(missing)} (found: {', '.join(ds.column_names)})")
        default_split = hub_split or params.split or "train"
        where_of = str(path) if hub_split == "" else f"{spec} ({hub_split})"
        for i, rec in enumerate(ds):
            pair = record_to_pair(rec, _row_name(where_of, fmt, i), default_split)
            if params.test_fraction is not None and rec.get("split") is None:
                pair.split = "test" if _draw(pair.prompt, params.seed) < params.test_fraction else "train"
            out.setdefault(pair.split, []).append(pair)
    if not out:
        raise CurateError(f"--source {spec}: no rows")
    if params.limit:
        out = {s: rows[: params.limit] for s, rows in out.items()}
    return out, sources, label


def _draw(prompt: str, seed: int) -> float:
    """A uniform draw per (seed, prompt): the same prompt always lands in the same split."""
    h = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


# ---- DFAR pairs ---------------------------------------------------------------------------------------------
@dataclass
class _DfarRows:
    version: Version
    rows: dict[str, list[dict[str, Any]]]  # split -> id, prompt, completion, label, label_text, statement
    label_words: dict[int, str]
    template: str  # the completion template of the config (has {reason} for lr)


def _read_dfar(store: DatasetStore, params: PreferencesConfig) -> _DfarRows:
    v = store.get(str(params.from_dataset))
    if params.config not in v.configs():
        raise CurateError(f"{v.ref} has no config {params.config!r} (configs: {', '.join(v.configs())})")
    mparams = v.manifest.get("params") or {}
    words = mparams.get("label_words")
    template = mparams.get(f"{params.config}_completion_template")
    if not isinstance(words, dict) or not isinstance(template, str):
        raise CurateError(f"{v.ref}: its manifest records no label_words / {params.config}_completion_template: "
                          "--from needs a version built by `curate build dfar`")
    label_words = {int(k): str(w) for k, w in words.items()}
    if len(label_words) != 2:
        raise CurateError(f"{v.ref}: 'the opposite label' needs exactly two labels, not {sorted(label_words)}")
    splits = [s.strip() for s in params.split.split(",")] if params.split else v.splits(params.config)
    rows: dict[str, list[dict[str, Any]]] = {}
    for split in splits:
        t = v.read(params.config, split)
        need = {"id", "prompt", "completion", "label", "label_text"}
        if not need <= set(t.column_names):
            raise CurateError(f"{v.ref} config {params.config}: missing column(s) "
                              f"{', '.join(sorted(need - set(t.column_names)))}")
        recs = t.select(sorted(need)).to_pylist()
        if params.limit:
            recs = recs[: params.limit]
        statements = {}
        if "default" in v.configs() and "statement" in v.read("default", split).column_names:
            statements = dict(zip(*v.read("default", split).select(["id", "statement"]).to_pydict().values(),
                                  strict=True))
        for r in recs:
            r["statement"] = statements.get(r["id"], "")
        rows[split] = recs
    return _DfarRows(v, rows, label_words, template)


def _fill(template: str, rec: dict[str, Any], label: int, label_text: str, reason: str) -> str:
    return template.format(statement=rec["statement"], label=label, label_text=label_text, reason=reason,
                           id=rec["id"])


def _prefix(template: str, rec: dict[str, Any], label: int, label_text: str) -> str:
    """The completion template's text before {reason}, with the given label: the forced start of a generation."""
    head = template.split("{reason}", 1)[0]
    return head.format(statement=rec["statement"], label=label, label_text=label_text, id=rec["id"])


def _check_template(template: str) -> None:
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in TEMPLATE_FIELDS:
            raise CurateError(f"completion template field {name!r} unknown; available: {', '.join(TEMPLATE_FIELDS)}")


def first_line(text: str) -> str:
    """A local model's reason: its first non-empty line (a base model runs on into the next example)."""
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


class _GenerationLog:
    """Local generations, appended per chunk to a JSONL in the store's work dir: a rerun resumes."""

    def __init__(self, store: DatasetStore, name: str, key: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path = store.work_dir(name, f"generations-{digest}") / "generations.jsonl"
        self.done: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.done[rec["k"]] = rec["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: generated again

    def add(self, keys: list[str], texts: list[str]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            for k, t in zip(keys, texts, strict=True):
                fh.write(json.dumps({"k": k, "text": t}, ensure_ascii=False) + "\n")
                self.done[k] = t


def _generate_local(load_model: Callable[[], Any], tok: Any, inputs: list[list[int]], params: PreferencesConfig,
                    gen_log: _GenerationLog) -> list[str]:
    """Greedy continuations of `inputs`, `batch_size` per chunk, each chunk logged before the next. The weights
    are loaded only when something is left to generate (a rebuild reads every answer from the log)."""
    from curate.llm import rich_progress
    from train.scoring import generate

    keys = [hashlib.sha256(json.dumps(ids).encode()).hexdigest() for ids in inputs]
    todo = [i for i, k in enumerate(keys) if k not in gen_log.done]
    if len(todo) < len(inputs):
        log.info("resuming: %d of %d generations already in %s", len(inputs) - len(todo), len(inputs), gen_log.path)
    if not todo:  # a rebuild: every answer is in the log, no empty progress bar
        return [gen_log.done[k] for k in keys]
    model = load_model().eval()
    with rich_progress("generating rejected answers") as tick:
        tick(0, len(todo))
        for a in range(0, len(todo), params.batch_size):
            chunk = todo[a: a + params.batch_size]
            texts, _ = generate(model, tok, [inputs[i] for i in chunk], max_new_tokens=params.max_new_tokens,
                                batch_size=params.batch_size)
            gen_log.add([keys[i] for i in chunk], texts)
            tick(min(a + params.batch_size, len(todo)), len(todo))
    return [gen_log.done[k] for k in keys]


def _local_model(params: PreferencesConfig, kind: str,
                 what: str) -> tuple[Callable[[], Any], Any, str, dict[str, Any]]:
    """(a loader of the model, tokenizer, template, facts for the manifest and the generation key) for model: /
    student:. The facts come from the files, not the weights, so a rebuild need not load them."""
    from curate.models import load_causal_lm, load_tokenizer, model_files_key
    from train.modeling import RUN_FILE, check_model_spec, load_run, model_ref, run_tokenizer

    run = Path(what)
    if kind == "student" or (run / RUN_FILE).is_file():  # a run folder: merged weights or base + adapter
        if not (run / RUN_FILE).is_file():
            raise CurateError(f"--rejected student:{what}: not a run folder (no {RUN_FILE})")
        info = json.loads((run / RUN_FILE).read_text())
        tok = run_tokenizer(run)
        template = params.template or info.get("template", "plain")
        weights = run / "merged" if (run / "merged").is_dir() else run / "adapter"
        facts = {"run": str(run.resolve()), "run_sha256": hashlib.sha256((run / RUN_FILE).read_bytes()).hexdigest(),
                 "weights": model_files_key(str(weights))}
        return lambda: load_run(run, device=params.device)[0], tok, template, facts
    check_model_spec(what)
    ref = model_ref(what)
    tok = load_tokenizer(ref)
    facts = {"model": ref.describe(), "weights": model_files_key(ref.location), "revision": ref.revision}
    return lambda: load_causal_lm(ref, device=params.device), tok, params.template or "plain", facts


def _dfar_pairs(store: DatasetStore, params: PreferencesConfig, d: _DfarRows,
                counts: _Counts) -> tuple[dict[str, list[_Pair]], dict[str, Any]]:
    """Chosen = the gold completion; rejected per --rejected; returns pairs per split and generation facts."""
    kind, _, what = str(params.rejected).partition(":")
    _check_template(d.template)
    opposite = {lab: next(o for o in d.label_words if o != lab) for lab in d.label_words}
    flat = [(split, r) for split, recs in d.rows.items() for r in recs]
    texts: list[str | None]
    facts: dict[str, Any] = {"kind": kind}
    if kind == "openai":
        texts, facts = _openai_reasons(store, params, d, flat, opposite, counts)
    elif kind == "model" and "{reason}" not in d.template:
        texts = ["" for _ in flat]  # a label-only template: the rejected side is the opposite word, nothing to ask
        facts["recipe"] = "the completion template has no {reason}: rejected = the opposite label word only"
    else:
        from curate.models import prompt_token_ids

        load_model, tok, template, mfacts = _local_model(params, kind, what)
        facts |= {k: v for k, v in mfacts.items() if k != "weights"} | {"template": template}
        if kind == "model":
            prefixes = [_prefix(d.template, r, opposite[r["label"]], d.label_words[opposite[r["label"]]]).rstrip()
                        for _, r in flat]
            inputs = [prompt_token_ids(tok, r["prompt"], template)
                      + list(tok(p, add_special_tokens=False).input_ids) for (_, r), p in zip(flat, prefixes,
                                                                                               strict=True)]
            facts["recipe"] = ("greedy continuation of prompt ids + ids of the completion template before {reason} "
                               "with the opposite label (trailing spaces removed); reason = first non-empty line")
        else:
            inputs = [prompt_token_ids(tok, r["prompt"], template) for _, r in flat]
            facts["recipe"] = ("one greedy generation per prompt; label parsed as `curate eval` does; kept only "
                               "when the parsed label is wrong")
        key = {"kind": kind, "spec": what, **mfacts, "template": template, "max_new_tokens": params.max_new_tokens,
               "builder_version": BUILDER_VERSION}
        gen_log = _GenerationLog(store, params.name, key)
        log.info("local generations are logged (resumable) in %s", gen_log.path)
        texts = list(_generate_local(load_model, tok, inputs, params, gen_log))
    out: dict[str, list[_Pair]] = {}
    for (split, r), text in zip(flat, texts, strict=True):
        lab = int(r["label"])
        opp = opposite[lab]
        if text is None:  # an unusable API reply, counted where it was read
            continue
        if kind == "student":
            from train.scoring import parse_generation

            said, _ = parse_generation(text, d.label_words)
            if said is None:
                counts.dropped["student_unparsed"] += 1
                continue
            if said == lab:
                counts.dropped["student_right"] += 1
                continue
            rejected = text.rstrip()
            if not rejected.strip():
                counts.dropped["empty"] += 1
                continue
        else:
            reason = first_line(text) if kind == "model" else " ".join(text.split())
            if "{reason}" in d.template and not reason:
                counts.dropped["empty_reason"] += 1
                if len(counts.notes) < MAX_NOTES:
                    counts.notes.append(f"{split}: empty generated reason for id {r['id']}; row dropped")
                continue
            rejected = _fill(d.template, r, opp, d.label_words[opp], reason)
        if rejected == r["completion"]:
            counts.dropped["identical"] += 1
            continue
        out.setdefault(split, []).append(_Pair(r["id"], r["prompt"], r["completion"], rejected, split, label=lab,
                                               where=f"{d.version.ref} {split} id {r['id']}"))
    return out, facts


def _openai_reasons(store: DatasetStore, params: PreferencesConfig, d: _DfarRows,
                    flat: list[tuple[str, dict[str, Any]]], opposite: dict[int, int],
                    counts: _Counts) -> tuple[list[str | None], dict[str, Any]]:
    from curate.llm import LLMClient, LLMConfig, resolve_base_url, rich_progress

    model = str(params.rejected).partition(":")[2]
    url = resolve_base_url(params.base_url)
    messages = []
    for _, r in flat:
        opp = opposite[int(r["label"])]
        try:
            text = params.openai_prompt.format(statement=r["statement"], label_text=d.label_words[opp],
                                               prompt=r["prompt"])
        except (KeyError, IndexError, ValueError) as e:
            raise CurateError(f"--openai-prompt {params.openai_prompt!r}: {e!r} (fields: statement, label_text, "
                              "prompt)") from None
        messages.append([{"role": "user", "content": text}])
    cfg = LLMConfig(model=model, base_url=url, temperature=0.0, max_tokens=params.max_new_tokens,
                    concurrency=params.concurrency, cache_dir=store.root / "llm_cache")
    with LLMClient(cfg) as client, rich_progress("rejected answers (API)") as tick:
        replies = client.complete_many(messages, progress=tick)
        usage = client.usage.summary(model)
    out: list[str | None] = []
    for (split, r), reply in zip(flat, replies, strict=True):
        if reply.ok:
            out.append(reply.text)
            continue
        out.append(None)
        counts.dropped[f"api_{reply.problem}"] += 1
        if len(counts.notes) < MAX_NOTES:
            counts.notes.append(f"{split}: API reply for id {r['id']} unusable ({reply.problem}); row dropped "
                                "(not cached: a rerun asks again)")
    return out, {"kind": "openai", "model": model, "base_url": redact_url(url), "usage": usage,
                 "recipe": "one chat call per row at temperature 0; reason = the reply, whitespace collapsed"}


# ---- ids, overlap, tables -------------------------------------------------------------------------------------
def _assign_ids(pairs: dict[str, list[_Pair]], counts: _Counts) -> None:
    """Keep source ids when every row has one and they are unique; else content-hash ids (exact repeats dropped)."""
    flat = [p for rows in pairs.values() for p in rows]
    ids = [p.id for p in flat]
    if all(i is not None for i in ids) and len(set(ids)) == len(ids):
        return
    if any(i is not None for i in ids):
        counts.notes.append("source ids missing or not unique: content-hash ids used")
    seen: set[str] = set()
    for split, rows in pairs.items():
        kept = []
        for p in rows:
            p.id = content_id(p.prompt, p.chosen, p.rejected)
            if p.id in seen:
                counts.dropped["duplicate_pair"] += 1
                continue
            seen.add(p.id)
            kept.append(p)
        pairs[split] = kept


def _drop_overlap(pairs: dict[str, list[_Pair]], counts: _Counts) -> int:
    """Drop train pairs whose prompt is also a test prompt; returns how many."""
    if "train" not in pairs or "test" not in pairs:
        return 0
    test_prompts = {p.prompt for p in pairs["test"]}
    before = len(pairs["train"])
    pairs["train"] = [p for p in pairs["train"] if p.prompt not in test_prompts]
    n = before - len(pairs["train"])
    if n:
        counts.notes.append(f"{n} train pairs share their prompt with a test pair; dropped from train")
    return n


def _tables(pairs: list[_Pair], source: str, rejected_source: str) -> tuple[pa.Table, pa.Table]:
    cols = {
        "id": [p.id for p in pairs], "prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
        "rejected": [p.rejected for p in pairs], "split": [p.split for p in pairs],
        "source": [source] * len(pairs), "label": [p.label for p in pairs],
        "rejected_source": [rejected_source] * len(pairs),
    }
    side_rows = [(p.id, side, p.prompt, p.chosen if side == "chosen" else p.rejected, p.split)
                 for p in pairs for side in SIDES]
    sides = pa.table(dict(zip(SIDES_SCHEMA.names, map(list, zip(*side_rows, strict=True)), strict=True))
                     if side_rows else {n: [] for n in SIDES_SCHEMA.names}, schema=SIDES_SCHEMA)
    return pa.table(cols, schema=PAIRS_SCHEMA), sides


def build_preferences(store: DatasetStore, params: PreferencesConfig) -> BuildResult:
    """Read (a DFAR version + a rejected-answer generator, or a pairs file) → validate → write `params.name`."""
    params.validate()
    counts = _Counts()
    parents: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    if params.from_dataset is not None:
        d = _read_dfar(store, params)
        pairs, facts = _dfar_pairs(store, params, d, counts)
        sources: list[SourceFile] = []
        parents = [{"name": d.version.name, "tag": d.version.tag, "content_hash": d.version.hash,
                    "config": params.config}]
        source_label, rejected_source = d.version.ref, str(params.rejected)
        read = sum(len(r) for r in d.rows.values())
        split_order = list(d.rows)
        license_ = "mit"
    else:
        pairs, sources, source_label = load_source(params)
        rejected_source = "source"
        read = sum(len(r) for r in pairs.values())
        split_order = sorted(pairs, key=lambda s: (s != "train", s != "test", s))
        license_ = "other"
    _assign_ids(pairs, counts)
    overlap = _drop_overlap(pairs, counts)
    pairs = {s: pairs.get(s, []) for s in split_order if pairs.get(s)}
    counts.kept = sum(len(r) for r in pairs.values())
    if counts.kept == 0:
        why = ", ".join(f"{k} {v}" for k, v in sorted(counts.dropped.items())) or "none read"
        raise CurateError(f"no preference pairs left (dropped: {why})")
    if counts.dropped:
        counts.notes.insert(0, "dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.dropped.items())))
    recorded = asdict(params)
    recorded["base_url"] = redact_url(params.base_url)
    if params.source and Path(params.source).expanduser().exists():
        recorded["source"] = str(Path(params.source).expanduser().resolve())
    card: dict[str, Any] = {
        "pretty_name": "Preference pairs",
        "description": f"Preference pairs (prompt, chosen, rejected) from {source_label}; rejected: "
        f"{rejected_source}. The `sides` config holds the same pairs long, chosen row then rejected row.",
        "license": license_,
        "task_categories": ["text-generation"],
        "tags": ["preferences", "dpo", "alignment"],
        "default_config": "pairs",
        "config_notes": {
            "pairs": "id, prompt, chosen, rejected, split, source, label (gold label of a DFAR row), rejected_source",
            "sides": "id, side (chosen|rejected), prompt, completion, split: two rows per pair, chosen first",
        },
        "build_notes": "\n".join(f"- {n}" for n in counts.notes[:50]) or "Nothing dropped.",
    }
    if "recipe" in facts:
        card["rejected_recipe"] = facts["recipe"]
    with store.new_version(params.name, builder="preferences", builder_version=BUILDER_VERSION, params=recorded,
                           sources=sources, parents=parents, card=card) as w:
        tables = {split: _tables(rows, source_label, rejected_source) for split, rows in pairs.items()}
        for i, config in enumerate(("pairs", "sides")):  # manifest order: pairs then sides, splits as read
            for split, both in tables.items():
                w.write_table(config, split, both[i])
        w.add_params({"counts": {"read": read, "kept": counts.kept, "dropped": dict(sorted(counts.dropped.items())),
                                 "train_prompts_in_test_dropped": overlap,
                                 "per_split": {s: len(r) for s, r in pairs.items()}},
                      "rejected_generation": facts})
    return BuildResult(w.result.version, w.result.created, counts.notes, repaired=w.result.repaired)


__all__ = ["DEFAULT_OPENAI_PROMPT", "PreferencesConfig", "build_preferences", "content_id", "first_line",
           "load_source", "record_to_pair", "render_messages"]
