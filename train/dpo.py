"""`curate train dpo`: the aligned teacher of preference distillation, DPO (TRL's `DPOTrainer`) of an SFT run on
the pairs of a preference version (config ``pairs``: id, prompt, chosen, rejected).

The starting model is also the reference pi_ref. With LoRA (the default) TRL scores the reference by disabling
the adapter, so only one copy of the weights is held; full fine-tuning keeps an explicit frozen copy. The run
folder records the reference (path, its run.json's config identity and sha256) and beta, and saves merged
weights by default so that the run is a teacher for ``curate cache-logits --teacher <run>``. Pairs are
tokenized by the house rule (`train.preference_eval.tokenize_pairs`), not by TRL, so that the teacher is
trained on exactly the ids its logit cache and the preference evaluation score. Defaults of beta and lr, and
why: `train.config.DPOTeacherConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trl import DPOConfig, DPOTrainer

from curate.errors import CurateError
from train.config import DPOTeacherConfig
from train.modeling import RUN_FILE, load_run, load_student
from train.preference_eval import (
    PairIds,
    preference_metrics,
    read_pairs,
    score_pairs,
    tokenize_pairs,
    write_preference_eval,
)
from train.run_folder import RunFolder, version_record
from train.runner import (
    Prepared,
    RunResult,
    card_context,
    finished_result,
    step_lines,
    train_interruptibly,
    training_arguments,
)

log = logging.getLogger(__name__)
SHOWN = ("loss", "rewards/margins", "rewards/accuracies", "eval_loss", "eval_rewards/margins", "learning_rate")


class PairsDPOTrainer(DPOTrainer):
    """`DPOTrainer` on pairs that are already ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        # TRL would re-tokenize prompt + response text jointly and append EOS; the ids come from tokenize_pairs.
        return dataset


def config_identity(method: str | None, config: dict[str, Any]) -> str | None:
    """The identity hash (the suffix of a default run-folder name) of a recorded run config."""
    from train.config import KDConfig, RLSageConfig, SFTConfig

    cls = {"sft": SFTConfig, "kd": KDConfig, "rl-sage": RLSageConfig, "dpo": DPOTeacherConfig}.get(method or "")
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in config.items() if k in names}).identity()
    except (TypeError, ValueError):
        return None


def reference_record(spec: str) -> dict[str, Any]:
    """How a DPO run names its reference: a run folder by path, config identity and run.json sha256; any other
    model spec as given."""
    p = Path(spec)
    if not (p / RUN_FILE).is_file():
        return {"run": False, "path": spec}
    text = (p / RUN_FILE).read_text()
    info = json.loads(text)
    return {"run": True, "path": str(p.resolve()), "method": info.get("method"),
            "identity": config_identity(info.get("method"), info.get("config") or {}),
            "run_json_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "weights": "merged" if (p / "merged").is_dir() else "adapter", "model": info.get("model"),
            "template": info.get("template"), "tokenizer_fingerprint": info.get("tokenizer_fingerprint")}


def load_reference(cfg: DPOTeacherConfig, tokenizer: Any | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """The starting model (= pi_ref) in full, without LoRA: an adapter-only run is rebuilt (base + its adapter,
    merged); merged runs and other specs load as `load_student` loads them."""
    p = Path(cfg.model)
    if (p / RUN_FILE).is_file() and not (p / "merged").is_dir():
        model, tok, info = load_run(p, device="cpu", dtype=cfg.dtype)
        model.requires_grad_(True)  # peft froze the base weights that its merge wrote into
        facts = {"model": f"{p.resolve()} ({info.get('model')} + its adapter, merged)", "model_location": None,
                 "model_gguf": None, "quantization": "none",
                 "quantization_reason": "an adapter run is merged into full-precision base weights"}
        return model, tokenizer if tokenizer is not None else tok, facts
    model, tok, facts = load_student(dataclasses.replace(cfg, use_lora=False), tokenizer)
    return model, tok, facts


def _lora_config(cfg: DPOTeacherConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM", bias="none")


def _as_dataset(pairs: list[PairIds]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt_ids": [p.prompt_ids for p in pairs], "chosen_ids": [p.chosen_ids for p in pairs],
                              "rejected_ids": [p.rejected_ids for p in pairs]})


def _template(cfg: DPOTeacherConfig) -> str:
    """--template, else the reference run's, else plain (a teacher should see prompts as its SFT run did)."""
    if cfg.template:
        return cfg.template
    p = Path(cfg.model) / RUN_FILE
    return (json.loads(p.read_text()).get("template") if p.is_file() else None) or "plain"


def run_dpo(cfg: DPOTeacherConfig, *, tokenizer: Any | None = None, console: Any = None) -> RunResult:
    """One DPO teacher run end to end: run folder, training (resumable), adapter + merged weights, preference
    evaluation on the held-out pairs, plots and the model card."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    from curate.models import tokenizer_fingerprint
    from curate.store import DatasetStore
    from train.plots import plot_losses

    say: Callable[..., None] = console.print if console is not None else (lambda *a, **k: None)
    cfg.validate()
    store = DatasetStore(cfg.store)
    version = store.get(cfg.dataset)
    where = f"{version.ref} {cfg.dataset_config}"
    train_table = read_pairs(version, cfg.dataset_config, cfg.train_split, cfg.limit)
    run = RunFolder.prepare(cfg, f"{version.name}-{version.tag}-{cfg.dataset_config}")
    if (done := finished_result(run, console)) is not None:  # a --resume with nothing left: before the model loads
        return done
    template = _template(cfg)
    reference = reference_record(cfg.model)
    model, tok, facts = load_reference(cfg, tokenizer)
    if cfg.use_lora and facts.get("quantization", "none") != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    train = tokenize_pairs(tok, train_table, template=template, max_length=cfg.max_length,
                           append_eos=cfg.append_eos, where=f"{where}/{cfg.train_split}")
    notes = list(train.notes)
    used = {cfg.train_split: train_table.num_rows}
    eval_pairs: list[PairIds] = []
    if cfg.eval_split in version.splits(cfg.dataset_config) and (cfg.evaluate or cfg.eval_steps):
        eval_table = read_pairs(version, cfg.dataset_config, cfg.eval_split, cfg.eval_limit)
        used[cfg.eval_split] = eval_table.num_rows
        ev = tokenize_pairs(tok, eval_table, template=template, max_length=cfg.max_length,
                            append_eos=cfg.append_eos, where=f"{where}/{cfg.eval_split}")
        eval_pairs = ev.pairs
        notes += [f"eval: {n}" for n in ev.notes]
    elif cfg.evaluate:
        notes.append(f"no preference evaluation: {where} has no split {cfg.eval_split!r}")
    ref_model = None
    if not cfg.use_lora:  # an explicit frozen copy (TRL would reload it from the policy's name_or_path)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    has_eval = bool(eval_pairs and cfg.eval_steps)
    args = training_arguments(cfg, run, has_eval, DPOConfig, beta=cfg.beta, loss_type=[cfg.loss_type],
                              max_length=cfg.max_length, activation_checkpointing=cfg.gradient_checkpointing,
                              bf16=False)

    try:
        trainer = PairsDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_as_dataset(train.pairs),
                                  eval_dataset=_as_dataset(eval_pairs) if has_eval else None, processing_class=tok,
                                  peft_config=_lora_config(cfg) if cfg.use_lora else None,
                                  callbacks=[step_lines(say, SHOWN)])  # the final runtime-only log: no line
    except ValueError as e:  # TRL's refusals of option combinations (loss_type, label smoothing, ...)
        raise CurateError(f"DPOTrainer: {str(e).splitlines()[0]}") from None
    trainer.remove_callback(PrinterCallback)
    policy = trainer.model
    if hasattr(policy, "get_nb_trainable_parameters"):
        trainable, total = policy.get_nb_trainable_parameters()
    else:
        trainable, total = policy.num_parameters(only_trainable=True), policy.num_parameters()
    facts.update(trainable_params=trainable, total_params=total, layers=model.config.num_hidden_layers,
                 tokenizer_fingerprint=tokenizer_fingerprint(tok), reference=reference, beta=cfg.beta,
                 trainer="trl.DPOTrainer")
    datasets = [version_record(version, cfg.dataset_config, used)]
    main = trainer.is_world_process_zero()
    if main:
        run.start(cfg, datasets, {**facts, "method": cfg.method, "template": template})
    resume = str(run.resume_from) if cfg.resume and run.resume_from else None
    output, seconds = train_interruptibly(trainer, run, cfg.method, resume)
    metrics: dict[str, Any] = {"train": {**output.metrics, "global_step": output.global_step,
                                         "wall_seconds": round(seconds, 2)}}
    if has_eval:
        metrics["eval_dpo"] = trainer.evaluate()
    if not main:
        return RunResult(run, metrics)
    policy = trainer.model
    if cfg.use_lora:
        policy.save_pretrained(str(run.adapter))
        tok.save_pretrained(str(run.adapter))
    if cfg.evaluate and eval_pairs:
        say(f"preference evaluation on {len(eval_pairs)} pairs of {where}/{cfg.eval_split}", highlight=False)
        with torch.no_grad():
            scores = score_pairs(policy, tok, eval_pairs, batch_size=cfg.batch_size)
            if cfg.use_lora:
                with policy.disable_adapter():
                    ref_scores = score_pairs(policy, tok, eval_pairs, batch_size=cfg.batch_size)
            else:
                ref_scores = score_pairs(ref_model, tok, eval_pairs, batch_size=cfg.batch_size)
        pm, records = preference_metrics([p.id for p in eval_pairs], scores, ref_scores, cfg.beta)
        pm.update(split=cfg.eval_split, template=template, append_eos=cfg.append_eos)
        write_preference_eval(run.path / "eval" / f"preferences-{version.name}-{cfg.eval_split}", pm, records,
                              title=f"{run.path.name} on {version.ref} {cfg.eval_split}")
        metrics["preference_eval"] = pm
        notes.append(f"preference eval on {pm['n']} held-out pairs: accuracy {pm['accuracy_sum']:.3f} (summed "
                     f"log-probs), {pm['accuracy_mean']:.3f} (per token); mean reward margin {pm['margin']:.4f} "
                     f"(beta {cfg.beta}, against the reference)")
    if cfg.save_merged or not cfg.use_lora:
        merged = policy.merge_and_unload() if cfg.use_lora else policy
        merged.save_pretrained(str(run.merged))
        tok.save_pretrained(str(run.merged))
    metrics["log_history"] = trainer.state.log_history
    metrics["notes"] = notes
    run.write_json("metrics.json", metrics)
    plots = [p for p in (plot_losses(trainer.state.log_history, run.plots / "loss.png", run.path.name),
                         plot_rewards(trainer.state.log_history, run.plots / "rewards.png", run.path.name)) if p]
    margins = run.path / "eval" / f"preferences-{version.name}-{cfg.eval_split}" / "margins.png"
    if "preference_eval" in metrics and margins.is_file():
        plots.append(margins)
    prep = Prepared(model=None, tokenizer=tok, train_dataset=None, eval_dataset=None, collator=None,
                    datasets=datasets, facts=facts, template=template, notes=notes)
    run.write_card(card_context(cfg, prep, metrics, run, plots))
    return RunResult(run, metrics)


def plot_rewards(log_history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """TRL's implicit rewards of chosen and rejected (beta · log pi/pi_ref) and their margin per logged step."""
    from train.plots import step_plot

    keys = {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "margin"}
    rows = [r for r in log_history if "rewards/margins" in r and "step" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    return step_plot({label: (steps, [r[key] for r in rows], "-") for key, label in keys.items()}, path,
                     ylabel="implicit reward (train batch)", title=title or "DPO rewards", zero_line=True)
