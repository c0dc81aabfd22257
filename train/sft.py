"""SFT on prompt/completion rows (`dfar` configs `l` = label only, `lr` = label + reason), loss on the
completion tokens only; `SFTTrainer` is `transformers.Trainer` with that loss."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from curate.store import DatasetStore
from train.config import SFTConfig
from train.data import CompletionCollator, ListDataset, mix_rows, pack, select_subsets, tokenize_rows
from train.modeling import load_student
from train.run_folder import RunFolder, version_record
from train.runner import Prepared, RunResult, finished_result, step_token_scale, train_and_save
from train.token_rows import completion_ce, logprobs_at, supervised_positions

SFT_COLUMNS = ("prompt", "completion")


class SFTTrainer(Trainer):
    """Completion-only cross-entropy, computed on supervised positions only (see `train/token_rows.py`).

    The model's built-in loss would project every prompt and pad position to the vocabulary; this computes
    the same mean NLL over completion tokens from the completion logits alone.
    """

    loss_is_scaled_for_ga = None  # scaled by `step_token_scale` exactly when Trainer passes num_items_in_batch

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        rows, pos, targets = supervised_positions(inputs["labels"])
        logprobs = logprobs_at(model, inputs["input_ids"], inputs.get("attention_mask"), rows, pos,
                               inputs.get("position_ids"))
        loss = completion_ce(logprobs, targets) * step_token_scale(self, targets.numel(), num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss


def prepare_sft(cfg: SFTConfig, tokenizer: Any | None = None) -> Prepared:
    """Read the dataset version, tokenize with prompt masking (optionally pack), load the student."""
    from curate.errors import CurateError

    store = DatasetStore(cfg.store)
    version = store.get(cfg.dataset)
    table = version.read(cfg.dataset_config, cfg.train_split)
    missing = [c for c in SFT_COLUMNS if c not in table.column_names]
    if missing:
        raise CurateError(f"{version.ref} config {cfg.dataset_config!r} lacks column(s) {', '.join(missing)}; "
                          "SFT needs prompt and completion")
    mixed = []
    if cfg.subsets or "subset" in table.column_names:  # ethics instruct: chosen paradigms, seeded mix
        table = select_subsets(table, cfg.subsets, f"{version.ref} {cfg.dataset_config}/{cfg.train_split}")
        table = table.take(mix_rows(table.num_rows, cfg.seed))
        counts = sorted(table.group_by("subset").aggregate([("subset", "count")]).to_pylist(),
                        key=lambda c: str(c["subset"]))
        mixed.append(f"subsets mixed in seeded order (seed {cfg.seed}): "
                     + ", ".join(f"{c['subset']} {c['subset_count']}" for c in counts))
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    if table.num_rows == 0:
        raise CurateError(f"{version.ref} {cfg.dataset_config}/{cfg.train_split} has no rows")
    model, tok, facts = load_student(cfg, tokenizer)
    from curate.models import tokenizer_fingerprint

    facts["tokenizer_fingerprint"] = tokenizer_fingerprint(tok)
    train = tokenize_rows(tok, table["prompt"].to_pylist(), table["completion"].to_pylist(),
                          template=cfg.template, max_length=cfg.max_length, append_eos=cfg.append_eos)
    notes = mixed + list(train.notes)
    examples = train.examples
    if cfg.packing:
        examples = pack(examples, cfg.max_length)
        notes.append(f"packed {len(train.examples)} examples into {len(examples)} blocks of <= {cfg.max_length}")
    used = {cfg.train_split: table.num_rows}
    eval_ds = None
    eval_rows = None
    if cfg.eval_split in version.splits(cfg.dataset_config):
        et = version.read(cfg.dataset_config, cfg.eval_split)
        if cfg.subsets:
            et = select_subsets(et, cfg.subsets, f"{version.ref} {cfg.dataset_config}/{cfg.eval_split}")
        if cfg.eval_limit:
            et = et.slice(0, cfg.eval_limit)
        used[cfg.eval_split] = et.num_rows
        if cfg.eval_steps:
            ev = tokenize_rows(tok, et["prompt"].to_pylist(), et["completion"].to_pylist(), template=cfg.template,
                               max_length=cfg.max_length, append_eos=cfg.append_eos)
            eval_ds = ListDataset(ev.examples)
        if cfg.evaluate and "label" in et.column_names:
            from train.evaluate import read_eval_rows

            eval_rows = read_eval_rows(store, f"{version.name}@{version.tag}", cfg.dataset_config,
                                       cfg.eval_split, cfg.eval_limit, cfg.subsets)
    return Prepared(model=model, tokenizer=tok, train_dataset=ListDataset(examples), eval_dataset=eval_ds,
                    collator=CompletionCollator(tok.pad_token_id), template=cfg.template,
                    datasets=[version_record(version, cfg.dataset_config, used)], facts=facts,
                    eval_rows=eval_rows, notes=notes)


def run_sft(cfg: SFTConfig, *, tokenizer: Any | None = None, console: Any = None) -> RunResult:
    """One SFT run end to end; returns the run folder and its metrics."""
    store = DatasetStore(cfg.store)
    version = store.get(cfg.dataset)
    run = RunFolder.prepare(cfg, f"{version.name}-{version.tag}-{cfg.dataset_config}")
    if (done := finished_result(run, console)) is not None:  # before the model loads
        return done
    prep = prepare_sft(cfg, tokenizer)
    return train_and_save(cfg, prep, SFTTrainer, run, console=console)
