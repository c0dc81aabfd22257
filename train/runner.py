"""What every method does around `Trainer.train()`: run folder, TrainingArguments, resume, saving the
adapter (and merged weights), post-training evaluation, plots and the model card."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from train.config import TrainConfig
from train.losses.preference import TERMS
from train.run_folder import RunFolder

# What the one-line progress shows of a logged step: the loss, its parts (KD: ce, kd; DCKD / ADPA: their terms)
SHOWN = ("loss", "ce", "kd", *TERMS, "eval_loss", "learning_rate", "epoch", "train_runtime")


@dataclass
class Prepared:
    """What a method hands the runner: data, model and the records that go into the run folder."""

    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any | None
    collator: Any
    datasets: list[dict[str, Any]]  # version records (by content hash)
    facts: dict[str, Any]  # run.json entries (base model location, kept layers, fingerprint, ...)
    eval_rows: Any | None = None  # train.evaluate.EvalRows for the post-training metrics
    template: str = "plain"
    label_prefix: str = " "  # text before the label word (KD: the cache's, which scored the teacher's labels)
    notes: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    run: RunFolder
    metrics: dict[str, Any]
    already_finished: bool = False  # --resume of a finished run: `metrics` are the recorded ones, nothing was run


def step_token_scale(trainer: Any, n_tokens: int, num_items_in_batch: Any) -> Any:
    """Factor that turns a micro-batch's token-mean loss into its share of the whole optimizer step's token mean.

    Trainer counts the supervised tokens of every accumulated micro-batch (``num_items_in_batch``, over
    ``labels[..., 1:]``, exactly our supervised positions) when the model takes loss kwargs, and then treats the
    loss as already scaled for accumulation (``loss_is_scaled_for_ga = None``): mean · n / N = sum / N, so batch
    8 and 2 × 4 accumulation give the same gradient even when micro-batches hold different numbers of tokens.
    Across processes the count is global while DDP averages gradients, hence the process factor (as
    `Trainer.compute_loss` does). Without a count (evaluation) the plain mean stays.
    """
    if num_items_in_batch is None:
        return 1.0
    args = trainer.args
    scale = n_tokens / num_items_in_batch
    if args.average_tokens_across_devices:
        scale = scale * (trainer.accelerator.num_processes if args.n_gpu <= 1 else args.n_gpu)
    return scale


def training_arguments(cfg: TrainConfig, run: RunFolder, has_eval: bool, args_cls: type | None = None,
                       **extra: Any) -> Any:
    """TrainingArguments from a config; ``args_cls`` a subclass (TRL's DPOConfig) with its own ``extra`` fields."""
    import torch
    from transformers import TrainingArguments

    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    eval_every = bool(has_eval and cfg.eval_steps)
    return (args_cls or TrainingArguments)(
        output_dir=str(run.checkpoints),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=cfg.eval_steps if eval_every else None,
        prediction_loss_only=True,
        remove_unused_columns=False,  # KD batches carry cache tensors the model's forward does not take
        label_names=["labels"],
        report_to="none",
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        dataloader_pin_memory=not use_cpu,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        **extra,
    )


def train_and_save(cfg: TrainConfig, prep: Prepared, trainer_cls: type, run: RunFolder,
                   trainer_kwargs: dict[str, Any] | None = None, console: Any = None,
                   extra_eval: Any | None = None) -> RunResult:
    """Train (resuming when asked), then on the main process save, evaluate, plot and write the card.

    ``extra_eval(model, tokenizer, run) -> (key, metrics, plots)`` adds a method's own evaluation of the trained
    (merged) model, e.g. preference accuracy for DCKD / ADPA."""
    say = console.print if console is not None else (lambda *a, **k: None)
    args = training_arguments(cfg, run, prep.eval_dataset is not None)
    trainer = trainer_cls(model=prep.model, args=args, train_dataset=prep.train_dataset,
                          eval_dataset=prep.eval_dataset, data_collator=prep.collator,
                          processing_class=prep.tokenizer, callbacks=[step_lines(say, SHOWN)],
                          **(trainer_kwargs or {}))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw dict prints; `step_lines` says the same in one line
    resume = str(run.resume_from) if cfg.resume and run.resume_from else None
    main = trainer.is_world_process_zero()
    if main:
        run.start(cfg, prep.datasets, {**prep.facts, "method": cfg.method, "template": prep.template})
    output, seconds = train_interruptibly(trainer, run, cfg.method, resume)
    if prep.eval_dataset is not None:
        trainer.evaluate()
    metrics: dict[str, Any] = {"train": {**output.metrics, "global_step": output.global_step,
                                         "wall_seconds": round(seconds, 2)}}
    if not main:
        return RunResult(run, metrics)
    model = trainer.model
    if cfg.use_lora:
        model.save_pretrained(str(run.adapter))
        prep.tokenizer.save_pretrained(str(run.adapter))
    merged = None
    if not cfg.use_lora or cfg.save_merged or (cfg.evaluate and (prep.eval_rows is not None or extra_eval)):
        merged = model.merge_and_unload() if cfg.use_lora else model
    if merged is not None and (cfg.save_merged or not cfg.use_lora):
        merged.save_pretrained(str(run.merged))
        prep.tokenizer.save_pretrained(str(run.merged))
    metrics["log_history"] = trainer.state.log_history
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if evals:
        metrics["eval_loss"] = evals[-1]["eval_loss"]
    if cfg.evaluate and prep.eval_rows is not None and merged is not None:
        import sys

        from curate.store import DatasetStore
        from train.evaluate import evaluate_model, training_data, write_eval
        from train.judge import make_judge

        say(f"evaluating on {len(prep.eval_rows.labels)} rows of {prep.eval_rows.version.ref}", highlight=False)
        judge = make_judge(cfg.judge, base_url=None, cache_dir=None, evaluated=(merged, prep.tokenizer))
        training = training_data(run.path, DatasetStore(cfg.store), list(prep.eval_rows.label_words.values()))
        ev, preds = evaluate_model(merged, prep.tokenizer, prep.eval_rows, template=prep.template,
                                   batch_size=cfg.batch_size, max_new_tokens=cfg.gen_max_new_tokens,
                                   max_length=cfg.max_length, label_prefix=prep.label_prefix, judge=judge,
                                   training=training, progress=sys.stderr.isatty())
        write_eval(run.path / "eval", ev, preds, title=run.path.name)
        metrics["eval"] = ev
    extra_plots: list[Path] = []
    if cfg.evaluate and extra_eval is not None and merged is not None:
        key, extra_metrics, extra_plots = extra_eval(merged, prep.tokenizer, run)
        metrics[key] = extra_metrics
    metrics["notes"] = prep.notes
    run.write_json("metrics.json", metrics)
    from train.plots import plot_losses

    plots = [p for p in [plot_losses(trainer.state.log_history, run.plots / "loss.png", run.path.name)] if p]
    plots += extra_plots
    if (run.path / "eval" / "confusion_matrix.png").is_file():
        plots.append(run.path / "eval" / "confusion_matrix.png")
    run.write_card(card_context(cfg, prep, metrics, run, plots))
    return RunResult(run, metrics)


def step_lines(say: Callable[..., None], keys: tuple[str, ...]) -> Any:
    """A Trainer callback printing one line per logged step: the ``keys`` present, floats at 4 significant
    digits (a 5e-05 learning rate stays 5e-05); a log with none of them prints nothing. Trainer's tqdm is off:
    it floods logs on CPU runs."""
    from transformers import TrainerCallback

    class StepLines(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not (state.is_world_process_zero and logs):
                return
            shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in logs.items() if k in keys}
            if shown:
                say(f"step {state.global_step}/{state.max_steps} {shown}", highlight=False)

    return StepLines()


def finished_result(run: RunFolder, console: Any = None) -> RunResult | None:
    """What a --resume of an already finished run returns: the recorded results, said in one line; None when
    there is training left. Trainer would run 0 steps and report a 0.0 loss, and the evaluation, metrics.json,
    the card and a new run.json segment would replace the real results. Every trainer calls it right after
    `RunFolder.prepare`, before loading any model (so `train_and_save` never sees a finished run)."""
    if run.finished_at is None:
        return None
    if console is not None:
        console.print(run.finished_message(), highlight=False)
    return RunResult(run, run.read_json("metrics.json") or {}, already_finished=True)


def train_interruptibly(trainer: Any, run: RunFolder, method: str, resume: str | None) -> tuple[Any, float]:
    """`trainer.train()` and its wall time; Ctrl-C becomes one line naming the command that resumes."""
    t0 = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        raise CurateError(interrupted_message(run, method, trainer.state.global_step)) from None
    return output, time.perf_counter() - t0


def interrupted_message(run: RunFolder, method: str, step: int) -> str:
    """What a Ctrl-C leaves and the exact command that continues from it."""
    last = run.latest_checkpoint()
    if last is None:
        return (f"interrupted at step {step}, before any complete checkpoint: nothing to resume in {run.path}; "
                "start again with --overwrite (or a smaller --save-steps)")
    return (f"interrupted at step {step}; the last complete checkpoint is {last.name}. Resume with: "
            f"{run.resume_command(method)}")


def card_context(cfg: TrainConfig, prep: Prepared, metrics: dict[str, Any], run: RunFolder,
                 plots: list[Path]) -> dict[str, Any]:
    from huggingface_hub import ModelCardData

    ev = metrics.get("eval") or {}
    tags = ["ethics-curate", cfg.method] + (["knowledge-distillation"] if cfg.method == "kd" else []) + (
        ["lora"] if cfg.use_lora else [])
    card_data = ModelCardData(library_name="peft" if cfg.use_lora else "transformers", base_model=prep.facts["model"],
                              pipeline_tag="text-generation", tags=tags,
                              datasets=[f"{d['name']}@{d['tag']}" for d in prep.datasets])
    return {
        "card_data": card_data.to_yaml(),
        "name": run.path.name,
        "method": cfg.method,
        "cfg": cfg.to_dict(),
        "facts": prep.facts,
        "datasets": prep.datasets,
        "train": metrics["train"],
        "eval": ev,
        "eval_loss": metrics.get("eval_loss"),
        "plots": [str(p.relative_to(run.path)) for p in plots],
        "notes": prep.notes,
        "has_adapter": cfg.use_lora,
        "has_merged": run.merged.is_dir(),
    }


def require_rows(n: int, what: str) -> None:
    if n == 0:
        raise CurateError(f"{what} has no rows to train on")
