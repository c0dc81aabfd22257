"""DFAR (Dataset for Aligning Reasons): ethical/unethical labels with a written reason per statement.

Configs written:
- ``default``: one normalised row per statement: id, statement, label, label_text, reason, split.
- ``l``:  SFT view, prompt -> label word (the "label only" baseline of the DFAR paper).
- ``lr``: SFT view, prompt -> label word + reason (the L+R fine-tuning that beats label only).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from builders.base import BuildResult
from curate.csvfile import iter_csv_rows
from curate.errors import CurateError, InputError
from curate.sources import resolve_files, source_record
from curate.store import DatasetStore

BUILDER_VERSION = "1.0.0"
UPSTREAM_COMMIT = "main"
UPSTREAM = {
    name: f"https://raw.githubusercontent.com/apurba-nsu-rnd-lab/DFAR/{UPSTREAM_COMMIT}/DFAR%20dataset/{name}"
    for name in ("DFAR_trainset.csv", "DFAR_testset.csv")
}
FILES = {"train": "DFAR_trainset.csv", "test": "DFAR_testset.csv"}
LABEL_WORDS = {0: "ethical", 1: "unethical"}
DEDUPE_POLICIES = ("none", "within-split", "train-test")

DEFAULT_PROMPT = (
    "Is the following statement ethical or unethical? Answer with one word, then explain why.\n"
    "Statement: {statement}\nAnswer:"
)
DEFAULT_L_COMPLETION = " {label_text}"
DEFAULT_LR_COMPLETION = " {label_text}. Reason: {reason}"


@dataclass
class DfarParams:
    """Everything that changes the output; recorded verbatim in the manifest."""

    prompt_template: str = DEFAULT_PROMPT
    l_completion_template: str = DEFAULT_L_COMPLETION
    lr_completion_template: str = DEFAULT_LR_COMPLETION
    label_words: dict[int, str] = field(default_factory=lambda: dict(LABEL_WORDS))
    dedupe: str = "none"
    limit: int | None = None  # keep only the first N rows of each split (quick runs)


def statement_id(statement: str) -> str:
    return hashlib.sha256(statement.strip().encode()).hexdigest()[:16]


def read_split(path: Path, split: str, label_words: dict[int, str]) -> list[dict]:
    rows = []
    for row_no, rec in iter_csv_rows(path, ["Statement", "Label", "Reason"]):
        statement = rec["Statement"].strip()
        if not statement:
            raise InputError(path, "empty Statement", row=row_no)
        try:
            label = int(rec["Label"].strip())
        except ValueError:
            label = None
        if label not in label_words:
            raise InputError(
                path, f"Label {rec['Label']!r} is not one of {sorted(label_words)}", row=row_no
            )
        rows.append(
            {
                "id": statement_id(statement),
                "statement": statement,
                "label": label,
                "label_text": label_words[label],
                "reason": rec["Reason"].strip(),
                "split": split,
                "_row": row_no,
            }
        )
    return rows


def apply_dedupe(rows: dict[str, list[dict]], policy: str, notes: list[str]) -> dict[str, list[dict]]:
    """Report duplicate statements; drop them only when the policy says so."""
    if policy not in DEDUPE_POLICIES:
        raise CurateError(f"--dedupe must be one of {', '.join(DEDUPE_POLICIES)}, not {policy!r}")
    out = {}
    for split, rs in rows.items():
        seen: set[str] = set()
        kept = []
        for r in rs:
            if r["id"] in seen:
                notes.append(f"{split}: duplicate statement at row {r['_row']}: {r['statement'][:60]!r}")
                if policy != "none":
                    continue
            seen.add(r["id"])
            kept.append(r)
        out[split] = kept
    if "train" in out and "test" in out:
        test_ids = {r["id"] for r in out["test"]}
        overlap = [r for r in out["train"] if r["id"] in test_ids]
        if overlap:
            notes.append(
                f"{len(overlap)} train statements also appear in test (train/test overlap)"
                + ("; dropped from train" if policy == "train-test" else "; kept (use --dedupe train-test)")
            )
            if policy == "train-test":
                out["train"] = [r for r in out["train"] if r["id"] not in test_ids]
    return out


def build_dfar(store: DatasetStore, source: str | Path, params: DfarParams | None = None,
               name: str = "dfar") -> BuildResult:
    """Read the two DFAR CSVs from `source` (folder or 'upstream') and write a new version of `name`."""
    params = params or DfarParams()
    found = resolve_files(source, list(FILES.values()), UPSTREAM)
    missing = [f for f in FILES.values() if f not in found]
    if missing:
        raise CurateError(f"DFAR source {source} lacks {', '.join(missing)}")
    notes: list[str] = []
    rows = {split: read_split(found[f][0], split, params.label_words) for split, f in FILES.items()}
    if params.limit:
        rows = {s: rs[: params.limit] for s, rs in rows.items()}
    rows = apply_dedupe(rows, params.dedupe, notes)
    for split, rs in rows.items():
        empty = [r["_row"] for r in rs if not r["reason"]]
        if empty:
            notes.append(f"{split}: {len(empty)} empty reasons (rows {', '.join(map(str, empty[:10]))}…); kept")

    card = {
        "pretty_name": "DFAR: Dataset for Aligning Reasons",
        "description": "Statements labelled ethical (0) or unethical (1), each with a human-written reason. "
        "The `l` and `lr` configs are ready-made SFT views for label-only and label+reason fine-tuning.",
        "license": "mit",
        "task_categories": ["text-classification", "text-generation"],
        "tags": ["ethics", "alignment", "dfar"],
        "label_mapping": {k: v for k, v in params.label_words.items()},
        "default_config": "default",
        "config_notes": {
            "default": "normalised rows: id (sha256 of the statement), statement, label, label_text, reason, split",
            "l": "prompt -> label word (label-only SFT)",
            "lr": "prompt -> label word + reason (L+R SFT)",
        },
        "license_notes": "DFAR is MIT licensed (apurba-nsu-rnd-lab/DFAR) and derived from ETHICS (MIT).",
        "build_notes": "\n".join(f"- {n}" for n in notes[:50]) if notes else "No duplicates or empty reasons found.",
    }
    sources = [source_record(*found[f]) for f in FILES.values()]
    with store.new_version(
        name, builder="dfar", builder_version=BUILDER_VERSION, params=_params_dict(params),
        sources=sources, card=card,
    ) as w:
        for split, rs in rows.items():
            w.write_table("default", split, _default_table(rs))
        for config, template in (("l", params.l_completion_template), ("lr", params.lr_completion_template)):
            for split, rs in rows.items():
                w.write_table(config, split, _sft_table(rs, params.prompt_template, template))
    return BuildResult(w.result.version, w.result.created, notes)


def _params_dict(params: DfarParams) -> dict:
    d = asdict(params)
    d["label_words"] = {str(k): v for k, v in params.label_words.items()}
    return d


def _default_table(rows: list[dict]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "statement": pa.array([r["statement"] for r in rows], pa.string()),
            "label": pa.array([r["label"] for r in rows], pa.int8()),
            "label_text": pa.array([r["label_text"] for r in rows], pa.string()),
            "reason": pa.array([r["reason"] for r in rows], pa.string()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
        }
    )


def _sft_table(rows: list[dict], prompt_template: str, completion_template: str) -> pa.Table:
    try:
        prompts = [prompt_template.format(**r) for r in rows]
        completions = [completion_template.format(**r) for r in rows]
    except KeyError as e:
        raise CurateError(
            f"template field {e} unknown; available: statement, label, label_text, reason, id"
        ) from None
    return pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "prompt": pa.array(prompts, pa.string()),
            "completion": pa.array(completions, pa.string()),
            "label": pa.array([r["label"] for r in rows], pa.int8()),
            "label_text": pa.array([r["label_text"] for r in rows], pa.string()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
        }
    )
