"""`curate train sft|lr|kd`: fine-tune (label only / label + reason) or distil a student; one run folder each.

Every option is also a YAML key (``--config run.yaml``); flags given on the command line win over the file,
and ``--set key=value`` is the same thing spelled as YAML. The options are generated from the config
dataclasses (`train/config.py`), where each is declared once with its help text. Multi-GPU:
``accelerate launch .venv/bin/curate train …`` or ``torchrun --nproc-per-node N .venv/bin/curate train …``
(Trainer does data parallelism).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from curate.commands._app import StoreOpt, app, console, friendly_errors, safe
from curate.commands._options import config_options
from curate.errors import CurateError
from train.config import ADPAConfig, DCKDConfig, DPOTeacherConfig, KDConfig, RLSageConfig, SFTConfig

train_app = typer.Typer(help="Fine-tune (SFT: label only or label + reason) or distil (KD) a student.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of options (flags override it).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Any option as key=value (YAML value), "
                                                                "repeatable: --set warmup=0.1")]


def _overrides(cls: type, options: dict[str, Any], sets: list[str] | None, store: Path | None) -> dict[str, Any]:
    """Flags given on the command line, then `--set` pairs (YAML values, text read as the flag's would be:
    ``--set lora_target_modules=q_proj,v_proj`` is a list), as one layer of config values."""
    from curate.commands._options import from_text
    from curate.configs import field_types
    from train.config import parse_value

    known = {f.name: f for f in fields(cls)}
    out = dict(options)
    if store is not None:
        out["store"] = str(store)
    for spec in sets or []:
        key, eq, raw = spec.partition("=")
        if not eq or not key.strip():
            raise CurateError(f"--set wants key=value, got {spec!r}")
        key = key.strip().replace("-", "_")
        value = parse_value(raw)
        out[key] = from_text(known[key], field_types(cls)[key], value) if key in known else value
    return out


def _report(result: Any) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one report per launch, from rank 0
        return
    if getattr(result, "already_finished", False):  # said in one line by the trainer; nothing ran
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
        if "per_group" in ev:  # per paradigm and split (ethics instruct)
            from curate.commands.evaluate import print_group_table

            print_group_table(ev)
        if ev.get("reason_perplexity") is not None:  # none for label-only runs
            console.print(f"  gold-reason perplexity {ev['reason_perplexity']:.2f}", highlight=False)
    for note in m.get("notes") or []:  # also in metrics.json and the run card; said here so nobody misses them
        console.print(f"  [yellow]note[/]: {safe(note)}", highlight=False)


def _sft(config: Path | None, overrides: dict[str, Any]) -> None:
    from train.config import load_config
    from train.sft import run_sft

    _report(run_sft(load_config(SFTConfig, config, overrides), console=console))


@train_app.command("sft")
@friendly_errors
@config_options(SFTConfig)
def sft_cmd(config: ConfigOpt = None, store: StoreOpt = None, set_: SetOpt = None,
            options: dict[str, Any] | None = None) -> None:
    """SFT on prompt/completion rows, loss on completion tokens only (dfar `l`: the label-only baseline)."""
    _sft(config, _overrides(SFTConfig, options or {}, set_, store))


@train_app.command("lr")
@friendly_errors
@config_options(SFTConfig, exclude=["dataset_config"])
def lr_cmd(config: ConfigOpt = None, store: StoreOpt = None, set_: SetOpt = None,
           options: dict[str, Any] | None = None) -> None:
    """L+R fine-tuning: SFT on dfar `lr` (label word + reason), the stronger recipe of the DFAR paper."""
    _sft(config, {**_overrides(SFTConfig, options or {}, set_, store), "dataset_config": "lr"})


@train_app.command("kd")
@friendly_errors
@config_options(KDConfig)
def kd_cmd(config: ConfigOpt = None, store: StoreOpt = None, set_: SetOpt = None,
           options: dict[str, Any] | None = None) -> None:
    """Offline KD from cached teacher logits: alpha·CE + (1-alpha)·T²·D(teacher_T ‖ student_T), sparse top-k."""
    from train.config import load_config
    from train.kd import run_kd

    _report(run_kd(load_config(KDConfig, config, _overrides(KDConfig, options or {}, set_, store)),
                   console=console))


@train_app.command("rl-sage")
@friendly_errors
@config_options(RLSageConfig)
def rl_sage_cmd(config: ConfigOpt = None, store: StoreOpt = None, set_: SetOpt = None,
                options: dict[str, Any] | None = None) -> None:
    """Online RL (TRL GRPO) with a SaGE reward: each sampled answer's consistency with the answers to the other
    paraphrases of its question (answers only offline; answers + RoTs with --rot-model)."""
    from train.config import load_config
    from train.rl_sage import run_rl_sage

    result = run_rl_sage(load_config(RLSageConfig, config, _overrides(RLSageConfig, options or {}, set_, store)),
                         console=console)
    console.print(f"[green]run finished[/]: {result.run.path}", highlight=False)


@train_app.command("dpo")
@friendly_errors
@config_options(DPOTeacherConfig)
def dpo_cmd(config: ConfigOpt = None, store: StoreOpt = None, set_: SetOpt = None,
            options: dict[str, Any] | None = None) -> None:
    """DPO teacher (TRL DPOTrainer) from an SFT run on preference pairs; the run is the reference-aware teacher
    of `curate cache-logits --teacher <run>` (merged weights saved by default)."""
    from train.config import load_config
    from train.dpo import run_dpo

    result = run_dpo(load_config(DPOTeacherConfig, config, _overrides(DPOTeacherConfig, options or {}, set_, store)),
                     console=console)
    _report(result)
    pe = result.metrics.get("preference_eval")
    if pe and not result.already_finished:
        console.print(f"  held-out pairs (n={pe['n']}): accuracy {pe['accuracy_sum']:.3f} summed, "
                      f"{pe['accuracy_mean']:.3f} per token; reward margin {pe['margin']:.4f} (beta {pe['beta']})",
                      highlight=False)


def _print_preference_eval(result: Any) -> None:
    pe = result.metrics.get("preference_eval")
    if not pe or result.already_finished:
        return
    line = (f"  held-out pairs (n={pe['n']}): preference accuracy {pe['accuracy_sum']:.3f} summed, "
            f"{pe['accuracy_mean']:.3f} per token")
    if "margin" in pe:
        line += f"; reward margin {pe['margin']:.4f} under the DPO teacher (its own {pe['teacher']['margin']:.4f})"
    console.print(line, highlight=False)


@train_app.command("dckd")
@friendly_errors
@config_options(DCKDConfig)
def dckd_cmd(config: ConfigOpt = None, store: StoreOpt = None, set_: SetOpt = None,
             options: dict[str, Any] | None = None) -> None:
    """Dual-Constrained KD from a DPO teacher's cache of preference pairs: NLL(chosen) + alpha·KL(chosen) +
    beta·KL(rejected), token means, sparse top-k + tail bucket."""
    from train.config import load_config
    from train.dckd import run_dckd

    result = run_dckd(load_config(DCKDConfig, config, _overrides(DCKDConfig, options or {}, set_, store)),
                      console=console)
    _report(result)
    _print_preference_eval(result)


@train_app.command("adpa")
@friendly_errors
@config_options(ADPAConfig)
def adpa_cmd(config: ConfigOpt = None, store: StoreOpt = None, set_: SetOpt = None,
             options: dict[str, Any] | None = None) -> None:
    """Advantage-guided distillation (ADPA): NLL(chosen) - gamma · mean over rejected tokens of sum_k q_S·A, with
    A = log p_teacher - log p_reference from `curate build advantage`; --init <dckd run> gives ADPA+."""
    from train.adpa import run_adpa
    from train.config import load_config

    result = run_adpa(load_config(ADPAConfig, config, _overrides(ADPAConfig, options or {}, set_, store)),
                      console=console)
    _report(result)
    _print_preference_eval(result)
