"""`curate train sft|lr|kd`: fine-tune (label only / label + reason) or distil a student; one run folder each.

Every option is also a YAML key (``--config run.yaml``); flags given on the command line win over the file,
and ``--set key=value`` reaches any other option. Multi-GPU: ``accelerate launch .venv/bin/curate train …``
or ``torchrun --nproc-per-node N .venv/bin/curate train …`` (Trainer does data parallelism).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from curate.commands._app import StoreOpt, app, console, friendly_errors
from curate.errors import CurateError

train_app = typer.Typer(help="Fine-tune (SFT: label only or label + reason) or distil (KD) a student.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of options (flags override it).")]
ModelOpt = Annotated[str | None, typer.Option(help="Student: smollm2, hub id, folder, .gguf, or a run folder "
                                                   "saved with --save-merged.")]
LimitOpt = Annotated[int | None, typer.Option(help="Train on the first N rows only (quick runs).")]
EvalLimitOpt = Annotated[int | None, typer.Option(help="Rows of the eval split for eval loss / metrics.")]
MaxStepsOpt = Annotated[int | None, typer.Option(help="Stop after N optimizer steps (overrides --epochs).")]
EpochsOpt = Annotated[float | None, typer.Option(help="Training epochs.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Learning rate.")]
BatchOpt = Annotated[int | None, typer.Option(help="Per-device batch size.")]
AccumOpt = Annotated[int | None, typer.Option(help="Gradient accumulation steps.")]
MaxLenOpt = Annotated[int | None, typer.Option(help="Max tokens per example (completions are cut).")]
LoraROpt = Annotated[int | None, typer.Option(help="LoRA rank.")]
LoraAlphaOpt = Annotated[int | None, typer.Option(help="LoRA alpha.")]
LoraDropOpt = Annotated[float | None, typer.Option(help="LoRA dropout.")]
TargetsOpt = Annotated[str | None, typer.Option(help="LoRA target modules: all-linear or q_proj,v_proj,…")]
NoLoraOpt = Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapters (default) or full "
                                                                       "fine-tuning.", show_default=False)]
Bit8Opt = Annotated[bool | None, typer.Option("--load-in-8bit", help="bitsandbytes 8-bit (CUDA; CPU falls back).")]
Bit4Opt = Annotated[bool | None, typer.Option("--load-in-4bit", help="bitsandbytes 4-bit (CUDA; CPU falls back).")]
LayersOpt = Annotated[int | None, typer.Option(help="Keep N evenly spaced decoder layers of the model.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed (data order, LoRA init).")]
EvalOpt = Annotated[bool | None, typer.Option("--eval/--no-eval", help="Accuracy / F1 on the eval split after "
                                                                       "training.", show_default=False)]
EvalStepsOpt = Annotated[int | None, typer.Option(help="Eval loss every N steps (default: only at the end).")]
JudgeOpt = Annotated[str | None, typer.Option(help="Misalignment judge for the post-training eval: none, self, "
                                                   "local:<model>, openai:<model>.")]
MergedOpt = Annotated[bool | None, typer.Option("--save-merged", help="Also save merged full weights (to use the "
                                                                     "run as a teacher or a student init).")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Run folder (default runs/<method>-<data>-<config hash>).")]
ResumeOpt = Annotated[bool | None, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")]
OverwriteOpt = Annotated[bool | None, typer.Option("--overwrite", help="Delete an existing run folder first.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Any option as key=value (YAML value), "
                                                                "repeatable: --set warmup=0.1")]


def _overrides(values: dict[str, Any], sets: list[str] | None) -> dict[str, Any]:
    from train.config import parse_value

    out = {k: v for k, v in values.items() if v is not None}
    for spec in sets or []:
        key, eq, raw = spec.partition("=")
        if not eq or not key.strip():
            raise CurateError(f"--set wants key=value, got {spec!r}")
        out[key.strip().replace("-", "_")] = parse_value(raw)
    if isinstance(out.get("lora_target_modules"), str) and "," in out["lora_target_modules"]:
        out["lora_target_modules"] = [m.strip() for m in out["lora_target_modules"].split(",") if m.strip()]
    for key in ("run_dir", "store"):
        if key in out:
            out[key] = str(out[key])
    return out


def _report(result: Any) -> None:
    if os.environ.get("RANK", "0") != "0":  # one report per launch, from rank 0
        return
    m = result.metrics
    console.print(f"[green]run finished[/]: {result.run.path}", highlight=False)
    train = m.get("train", {})
    if "train_loss" in train:
        console.print(f"  {train['global_step']} steps, mean train loss {train['train_loss']:.4f}, "
                      f"{train['wall_seconds']:.1f} s", highlight=False)
    ev = m.get("eval")
    if ev:
        for reading in ("verbalizer", "generation"):
            r = ev[reading]
            console.print(f"  {reading:<11} acc {r['accuracy']:.3f}  P {r['precision']:.3f}  R {r['recall']:.3f}  "
                          f"F1 {r['f1']:.3f}  (n={r['n']})", highlight=False)
        console.print(f"  gold-reason perplexity {ev['reason_perplexity']:.2f}", highlight=False)


def _sft(dataset_config_default: str, config: Path | None, values: dict[str, Any], sets: list[str] | None) -> None:
    from train.config import SFTConfig, load_config
    from train.sft import run_sft

    overrides = _overrides(values, sets)
    if config is None:
        overrides.setdefault("dataset_config", dataset_config_default)
    cfg = load_config(SFTConfig, config, overrides)
    _report(run_sft(cfg, console=console))


@train_app.command("sft")
@friendly_errors
def sft_cmd(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset (name or name@tag) with prompt/completion.")] = None,
    dataset_config: Annotated[str | None, typer.Option(help="Config: l (label only, default) or lr.")] = None,
    packing: Annotated[bool | None, typer.Option("--packing", help="Pack examples into max-length blocks.")] = None,
    limit: LimitOpt = None, eval_limit: EvalLimitOpt = None, max_steps: MaxStepsOpt = None,
    epochs: EpochsOpt = None, learning_rate: LrOpt = None, batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None, max_length: MaxLenOpt = None, lora_r: LoraROpt = None,
    lora_alpha: LoraAlphaOpt = None, lora_dropout: LoraDropOpt = None, lora_target_modules: TargetsOpt = None,
    use_lora: NoLoraOpt = None, load_in_8bit: Bit8Opt = None, load_in_4bit: Bit4Opt = None,
    student_layers: LayersOpt = None, seed: SeedOpt = None, evaluate: EvalOpt = None,
    eval_steps: EvalStepsOpt = None, judge: JudgeOpt = None, save_merged: MergedOpt = None,
    run_dir: RunDirOpt = None, resume: ResumeOpt = None, overwrite: OverwriteOpt = None,
    store: StoreOpt = None, set_: SetOpt = None,
) -> None:
    """SFT on prompt/completion rows, loss on completion tokens only (dfar `l`: the label-only baseline)."""
    values = {k: v for k, v in locals().items() if k not in ("config", "set_")}
    _sft("l", config, values, set_)


@train_app.command("lr")
@friendly_errors
def lr_cmd(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset (name or name@tag) with prompt/completion.")] = None,
    packing: Annotated[bool | None, typer.Option("--packing", help="Pack examples into max-length blocks.")] = None,
    limit: LimitOpt = None, eval_limit: EvalLimitOpt = None, max_steps: MaxStepsOpt = None,
    epochs: EpochsOpt = None, learning_rate: LrOpt = None, batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None, max_length: MaxLenOpt = None, lora_r: LoraROpt = None,
    lora_alpha: LoraAlphaOpt = None, lora_dropout: LoraDropOpt = None, lora_target_modules: TargetsOpt = None,
    use_lora: NoLoraOpt = None, load_in_8bit: Bit8Opt = None, load_in_4bit: Bit4Opt = None,
    student_layers: LayersOpt = None, seed: SeedOpt = None, evaluate: EvalOpt = None,
    eval_steps: EvalStepsOpt = None, judge: JudgeOpt = None, save_merged: MergedOpt = None,
    run_dir: RunDirOpt = None, resume: ResumeOpt = None, overwrite: OverwriteOpt = None,
    store: StoreOpt = None, set_: SetOpt = None,
) -> None:
    """L+R fine-tuning: SFT on dfar `lr` (label word + reason), the seeds' stronger recipe."""
    values = {k: v for k, v in locals().items() if k not in ("config", "set_")}
    values["dataset_config"] = "lr"
    _sft("lr", config, values, set_)


@train_app.command("kd")
@friendly_errors
def kd_cmd(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    cache: Annotated[str | None, typer.Option(help="Teacher-logit cache version (default dfar-lr-logits).")] = None,
    alpha: Annotated[float | None, typer.Option(help="Weight of gold-token CE; 1 - alpha weighs the KD term "
                                                     "(1 = the no-teacher baseline).")] = None,
    temperature: Annotated[float | None, typer.Option(help="KD temperature T (loss scaled by T²).")] = None,
    loss: Annotated[str | None, typer.Option(help="forward_kl, reverse_kl or jsd.")] = None,
    kd_target: Annotated[str | None, typer.Option(help="tokens (sparse top-k per completion token) or labels "
                                                       "(label verbalizers at the answer position).")] = None,
    limit: LimitOpt = None, eval_limit: EvalLimitOpt = None, max_steps: MaxStepsOpt = None,
    epochs: EpochsOpt = None, learning_rate: LrOpt = None, batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None, max_length: MaxLenOpt = None, lora_r: LoraROpt = None,
    lora_alpha: LoraAlphaOpt = None, lora_dropout: LoraDropOpt = None, lora_target_modules: TargetsOpt = None,
    use_lora: NoLoraOpt = None, load_in_8bit: Bit8Opt = None, load_in_4bit: Bit4Opt = None,
    student_layers: LayersOpt = None, seed: SeedOpt = None, evaluate: EvalOpt = None,
    eval_steps: EvalStepsOpt = None, judge: JudgeOpt = None, save_merged: MergedOpt = None,
    run_dir: RunDirOpt = None, resume: ResumeOpt = None, overwrite: OverwriteOpt = None,
    store: StoreOpt = None, set_: SetOpt = None,
) -> None:
    """Offline KD from cached teacher logits: alpha·CE + (1-alpha)·T²·D(teacher_T ‖ student_T), sparse top-k."""
    values = {k: v for k, v in locals().items() if k not in ("config", "set_")}
    from train.config import KDConfig, load_config
    from train.kd import run_kd

    cfg = load_config(KDConfig, config, _overrides(values, set_))
    _report(run_kd(cfg, console=console))
