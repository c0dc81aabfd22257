"""Run configuration: one flat dataclass per method, loadable from YAML and overridable from CLI flags.

Flat (no nesting) so that a YAML key, a ``--set key=value`` and a dataclass field are the same name, and a
resolved config can be written back to the run folder and replayed verbatim.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from curate.errors import CurateError

TEMPLATES = ("plain", "chat")
KD_TARGETS = ("tokens", "labels")
# Fields that say where / how a run is kept, not what it computes: left out of the run's identity hash.
RUN_CONTROL = frozenset({"run_dir", "runs_dir", "resume", "overwrite", "store", "device"})


@dataclass
class TrainConfig:
    """Settings shared by every method (model, LoRA, optimisation, run folder, post-training evaluation)."""

    method: str = "sft"
    # model
    model: str = "smollm2"  # hub id, folder, .gguf path, `smollm2`, or a previous run folder (merged weights)
    gguf_file: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    student_layers: int | None = None  # keep this many decoder layers (evenly spaced) of the loaded model
    template: str = "plain"  # plain: prompt + completion ids; chat: the tokenizer's chat template around the prompt
    # LoRA (use_lora false: full fine-tuning)
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"
    # data
    max_length: int = 256
    limit: int | None = None  # first N training rows (quick runs)
    eval_limit: int | None = 64  # first N rows of the eval split (eval loss and post-training metrics)
    # optimisation
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.0  # a ratio of all steps when < 1, else a number of steps
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 200
    save_total_limit: int | None = 2
    eval_steps: int | None = None  # eval loss every N steps (None: once at the end)
    # after training
    evaluate: bool = True  # accuracy / P / R / F1 / reason perplexity on the eval split
    gen_max_new_tokens: int = 48
    judge: str = "none"  # misalignment judge for the post-training eval (see `curate eval --judge`)
    save_merged: bool = False  # also write merged full weights (usable as a teacher or a student init)
    # run folder
    runs_dir: str = "runs"
    run_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    store: str | None = None

    def validate(self) -> None:
        if self.template not in TEMPLATES:
            raise CurateError(f"template must be one of {', '.join(TEMPLATES)}, not {self.template!r}")
        if self.use_lora and self.lora_r < 1:
            raise CurateError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise CurateError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_length < 2:
            raise CurateError(f"max_length must be >= 2, got {self.max_length}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise CurateError("batch_size and grad_accum must be >= 1")
        if self.student_layers is not None and self.student_layers < 1:
            raise CurateError(f"student_layers must be >= 1, got {self.student_layers}")
        if self.resume and self.overwrite:
            raise CurateError("choose one of --resume and --overwrite")

    def identity(self) -> str:
        """Short hash of everything that changes what is computed (names the default run folder)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_CONTROL}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion rows: `l` (label only) or `lr` (label + reason) of dfar."""

    method: str = "sft"
    dataset: str = "dfar"  # name or name@tag in the store
    dataset_config: str = "l"
    train_split: str = "train"
    eval_split: str = "test"
    packing: bool = False
    append_eos: bool = True  # end each completion with EOS so generation learns to stop


@dataclass
class KDConfig(TrainConfig):
    """Offline KD from a teacher-logit cache version (and its parent dataset for evaluation)."""

    method: str = "kd"
    cache: str = "dfar-lr-logits"  # name or name@tag of the cache version
    train_split: str = "train"
    eval_split: str = "test"
    alpha: float = 0.5  # weight of CE on gold tokens; 1 - alpha weighs T² · D(teacher_T ‖ student_T)
    temperature: float = 2.0
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd (train/losses/)
    kd_target: str = "tokens"  # tokens: sparse top-k KD per completion token; labels: label verbalizers only

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 1.0:
            raise CurateError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise CurateError(f"temperature must be > 0, got {self.temperature}")
        if self.kd_target not in KD_TARGETS:
            raise CurateError(f"kd_target must be one of {', '.join(KD_TARGETS)}, not {self.kd_target!r}")
        from train.losses import get_loss

        get_loss(self.loss)


C = TypeVar("C", bound=TrainConfig)


def parse_value(text: str) -> Any:
    """`--set key=value` values are YAML scalars/lists: 3, 0.5, true, null, [q_proj, v_proj]."""
    return yaml.safe_load(text) if text != "" else ""


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults < YAML file < overrides (CLI flags); unknown keys are refused with the list of known ones."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CurateError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise CurateError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise CurateError(f"{p}: expected a mapping of option: value at the top level")
        values.update(data)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise CurateError(f"unknown {cls.__name__} option(s): {', '.join(unknown)} (known: {', '.join(known)})")
    if "method" in values and values["method"] != known["method"].default:
        raise CurateError(f"config says method {values['method']!r} but this command trains "
                          f"{known['method'].default!r}")
    cfg = cls(**values)
    _check_types(cfg)
    cfg.validate()
    return cfg


def _check_types(cfg: TrainConfig) -> None:
    """YAML gives ints for floats and strings for anything: coerce the harmless cases, refuse the rest."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if value is None or default is None:
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise CurateError(f"option {f.name} must be true or false, not {value!r}")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
        elif isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            raise CurateError(f"option {f.name} must be a number, not {value!r}")


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
