"""Run configuration: one flat dataclass per method, loadable from YAML and overridable from CLI flags.

Flat (no nesting) so that a YAML key, a ``--set key=value``, a ``--flag`` and a dataclass field are the same
name, and a resolved config can be written back to the run folder and replayed verbatim. Each field is
declared once with its type, limits and help (`curate.configs.opt`); `load_config` checks YAML and flags
by the same rules, and the CLI options are generated from these fields.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import annotated_types as at
import yaml

from curate.configs import ConfigError, load_config, opt
from curate.models import SMOLLM2, ModelSpec, Template

# Fields that say where / how a run is kept, not what it computes: left out of the run's identity hash.
RUN_CONTROL = frozenset({"run_dir", "runs_dir", "resume", "overwrite", "allow_changes", "store", "device"})
# Fields added after run folders were first named by `identity()`: hashed only when set, so an existing
# run's default folder name (and `--resume` into it) does not change.
HASHED_WHEN_SET = frozenset({"revision", "subsets"})

PositiveInt = Annotated[int, at.Ge(1)]


@dataclass
class TrainConfig(ModelSpec):
    """Settings shared by every method (model, LoRA, optimisation, run folder, post-training evaluation)."""

    model: str = opt(SMOLLM2, "Student: smollm2, hub id, folder, .gguf, or a run folder saved with --save-merged.")
    method: str = opt("sft", "Training method (set by the command).", cli=False, fixed=True)
    student_layers: PositiveInt | None = opt(None, "Keep N evenly spaced decoder layers of the model.")
    template: Template = opt("plain", "plain (prompt + completion ids) or chat (the tokenizer's chat template "
                                      "around the prompt).")
    # LoRA (use_lora false: full fine-tuning)
    use_lora: bool = opt(True, "LoRA adapters or full fine-tuning.", flags=("--lora/--full",))
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha.")
    lora_dropout: Annotated[float, at.Interval(ge=0, lt=1)] = opt(0.05, "LoRA dropout.")
    lora_target_modules: list[str] | str = opt("all-linear", "LoRA target modules: all-linear or q_proj,v_proj,...")
    # data
    max_length: Annotated[int, at.Ge(2)] = opt(256, "Max tokens per example (completions are cut).")
    limit: Annotated[int, at.Ge(0)] | None = opt(None, "Train on the first N rows only (quick runs).")
    eval_limit: Annotated[int, at.Ge(0)] | None = opt(64, "Rows of the eval split for eval loss / metrics.")
    # optimisation
    epochs: Annotated[float, at.Gt(0)] = opt(1.0, "Training epochs.")
    max_steps: Annotated[int, at.Ge(-1)] = opt(-1, "Stop after N optimizer steps (overrides --epochs; -1: off).")
    learning_rate: Annotated[float, at.Gt(0)] = opt(2e-4, "Learning rate.", flags=("--lr", "--learning-rate"))
    batch_size: PositiveInt = opt(8, "Per-device batch size.")
    grad_accum: PositiveInt = opt(1, "Gradient accumulation steps.")
    warmup: Annotated[float, at.Ge(0)] = opt(0.0, "Warmup: a ratio of all steps when < 1, else a number of steps.")
    weight_decay: Annotated[float, at.Ge(0)] = opt(0.0, "AdamW weight decay.")
    lr_scheduler: str = opt("linear", "transformers learning-rate scheduler (linear, cosine, constant, ...).")
    max_grad_norm: Annotated[float, at.Ge(0)] = opt(1.0, "Gradient clipping norm.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory).")
    seed: int = opt(0, "Random seed (data order, LoRA init).")
    logging_steps: PositiveInt = opt(5, "Log the training loss every N steps.")
    save_steps: PositiveInt = opt(200, "Checkpoint every N steps.")
    save_total_limit: PositiveInt | None = opt(2, "Checkpoints kept (null: all).")
    eval_steps: PositiveInt | None = opt(None, "Eval loss every N steps (default: only at the end).")
    # after training
    evaluate: bool = opt(True, "Accuracy / F1 on the eval split after training.", flags=("--eval/--no-eval",))
    gen_max_new_tokens: PositiveInt = opt(48, "Greedy generation length of the post-training evaluation.")
    judge: str = opt("none", "Misalignment judge for the post-training eval: none, self, local:<model>, "
                             "openai:<model>.")
    save_merged: bool = opt(False, "Also save merged full weights (to use the run as a teacher or a student init).")
    # run folder
    runs_dir: str = opt("runs", "Folder of default run folders.")
    run_dir: str | None = opt(None, "Run folder (default <runs-dir>/<method>-<data>-<config hash>).")
    resume: bool = opt(False, "Continue from the run folder's last checkpoint.")
    overwrite: bool = opt(False, "Delete an existing run folder first.")
    allow_changes: bool = opt(False, "With --resume: continue even if options differ from the run's (recorded as "
                                     "a new segment).")
    store: str | None = opt(None, "Store folder (default: $CURATE_STORE, else ./.curate).")

    def validate(self) -> None:
        """Rules across fields (single values are checked by their types)."""
        if self.use_lora and self.lora_r < 1:
            raise ConfigError("lora_r", f"lora_r must be >= 1, got {self.lora_r}")
        if self.load_in_8bit and self.load_in_4bit:
            raise ConfigError("load_in_4bit", "choose one of --load-in-8bit and --load-in-4bit")
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", "choose one of --resume and --overwrite")

    def identity(self) -> str:
        """Short hash of everything that changes what is computed (names the default run folder)."""
        d = {k: v for k, v in self.to_dict().items()
             if k not in RUN_CONTROL and not (k in HASHED_WHEN_SET and v is None)}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def to_dict(self) -> dict[str, Any]:
        """Field values, `method` first (the order of a written config.yaml)."""
        from dataclasses import asdict

        d = asdict(self)
        return {"method": d.pop("method"), **d}


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion rows: `l` (label only) or `lr` (label + reason) of dfar."""

    method: str = opt("sft", "Training method (set by the command).", cli=False, fixed=True)
    dataset: str = opt("dfar", "Dataset (name or name@tag) with prompt/completion.")
    dataset_config: str = opt("l", "Dataset config: l (label only) or lr (label + reason).")
    train_split: str = opt("train", "Split to train on.")
    eval_split: str = opt("test", "Split for eval loss and the post-training evaluation.")
    subsets: list[str] | None = opt(None, "Subsets of a dataset with a subset column (ethics instruct: "
                                          "deontology,justice); default all, mixed in a seeded order.")
    packing: bool = opt(False, "Pack examples into max-length blocks.")
    append_eos: bool = opt(True, "End each completion with EOS so generation learns to stop.")


@dataclass
class KDConfig(TrainConfig):
    """Offline KD from a teacher-logit cache version (and its parent dataset for evaluation)."""

    method: str = opt("kd", "Training method (set by the command).", cli=False, fixed=True)
    # KD trains on the cache's own token ids, so the template is the cache's; another value is refused.
    template: Template | None = opt(None, "Must match the cache's template (default: the cache's).")
    cache: str = opt("dfar-lr-logits", "Teacher-logit cache version (name or name@tag).")
    train_split: str = opt("train", "Cache split to train on.")
    subsets: list[str] | None = opt(None, "Train on the cached rows of these subsets of the parent (ethics instruct: "
                                          "deontology,justice); default all, mixed in a seeded order.")
    eval_split: str = opt("test", "Split for eval loss and the post-training evaluation (of the cache's parent).")
    alpha: Annotated[float, at.Interval(ge=0, le=1)] = opt(
        0.5, "Weight of gold-token CE; 1 - alpha weighs the KD term (1 = the no-teacher baseline).")
    temperature: Annotated[float, at.Gt(0)] = opt(2.0, "KD temperature T (loss scaled by T²).")
    loss: str = opt("forward_kl", "Divergence: forward_kl, reverse_kl or jsd (train/losses/).")
    kd_target: Literal["tokens", "labels"] = opt(
        "tokens", "tokens (sparse top-k per completion token) or labels (label verbalizers at the answer position).")

    def validate(self) -> None:
        super().validate()
        from train.losses import LOSSES

        if self.loss not in LOSSES:
            raise ConfigError("loss", f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")

    def identity(self) -> str:
        # Before `template` could be left to the cache it defaulted to "plain": hash it so, keeping folder names.
        if self.template is None:
            from dataclasses import replace

            return replace(self, template="plain").identity()
        return super().identity()


@dataclass
class RLSageConfig(TrainConfig):
    """Online RL (TRL GRPO) with a SaGE reward: each sampled answer scores its consistency with the other
    answers to paraphrases of the same question."""

    method: str = opt("rl-sage", "Training method (set by the command).", cli=False, fixed=True)
    template: Template = opt("chat", "chat (the tokenizer's chat template around the answer prompt) or plain.")
    questions: str = opt("quality100", "Questions with paraphrases: quality100, moral100-high, moral100-low, a CSV "
                                       "(MCC layout) or a store dataset.")
    limit_questions: Annotated[int, at.Ge(1)] | None = opt(8, "Train on the first N questions.")
    paraphrases: PositiveInt = opt(2, "Paraphrases kept per question (rows are grouped by question).")
    num_generations: Annotated[int, at.Ge(2)] = opt(4, "Answers sampled per prompt (the GRPO group).")
    max_completion_length: PositiveInt = opt(48, "Tokens per sampled answer.")
    rl_temperature: Annotated[float, at.Gt(0)] = opt(0.9, "Sampling temperature of the answers.")
    kl_beta: Annotated[float, at.Ge(0)] = opt(0.0, "KL penalty to the base model (0: none, no reference model).")
    format_weight: Annotated[float, at.Ge(0)] = opt(0.0, "Weight of a format term: 1 for a non-empty answer that "
                                                         "ended before the length limit.")
    rot_model: str | None = opt(None, "RoT model through the LLM client: reward on answers and RoTs (default: "
                                      "answers only, works offline).")
    rot_base_url: str | None = opt(None, "Endpoint of the RoT model (default $OPENAI_BASE_URL).")
    embedding_model: str = opt("sentence-transformers/all-MiniLM-L6-v2", "Embedding model of the reward.")
    max_steps: Annotated[int, at.Ge(-1)] = opt(4, "Stop after N optimizer steps (-1: --epochs).")
    batch_size: PositiveInt = opt(8, "Sampled answers per device step (a multiple of --num-generations).")
    learning_rate: Annotated[float, at.Gt(0)] = opt(1e-5, "Learning rate.", flags=("--lr", "--learning-rate"))
    logging_steps: PositiveInt = opt(1, "Log reward and loss every N steps.")
    evaluate: bool = opt(False, "(DFAR accuracy: run `curate eval --model <run>` after training.)",
                         flags=("--eval/--no-eval",))

    def validate(self) -> None:
        super().validate()
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ConfigError("batch_size", f"batch_size x grad_accum ({self.batch_size * self.grad_accum}) must be "
                                            f"a multiple of num_generations ({self.num_generations})")


@dataclass
class DPOTeacherConfig(TrainConfig):
    """DPO (TRL's DPOTrainer) of an SFT run on preference pairs: the aligned teacher of DCKD / ADPA.

    Defaults, and why: the public teacher recipe fine-tunes a 7B model fully with beta 0.01 and lr 5e-7. A
    135M LoRA teacher trained for a few hundred CPU steps would barely move at that lr (LoRA updates start
    from zero and need a ~100x larger lr than full fine-tuning), so lr is 5e-5 (measured, SmolLM2-135M LoRA
    r16, 16 steps of batch 4 on DFAR pairs: held-out reward margin 0.126 at 5e-5, 0.0013 at 5e-7). With Adam
    the size of beta does not scale the step, it sets how far the policy may drift before the loss saturates;
    at the larger lr, beta 0.1 (the DPO paper's and TRL's default) keeps the teacher closer to its reference
    than 0.01 would (reasoned, not measured).
    For the public recipe: --full --beta 0.01 --lr 5e-7.
    """

    method: str = opt("dpo", "Training method (set by the command).", cli=False, fixed=True)
    model: str = opt(SMOLLM2, "The SFT run the teacher starts from; also the DPO reference (pi_ref): a run folder "
                              "(merged or adapter-only), or any model spec.")
    template: Template | None = opt(None, "plain or chat (default: the reference run's template, else plain).")
    dataset: str = opt("preferences", "Preference dataset (name or name@tag) with id, prompt, chosen, rejected.")
    dataset_config: str = opt("pairs", "Config of the pairs.")
    train_split: str = opt("train", "Split to train on.")
    eval_split: str = opt("test", "Held-out pairs for eval loss and the post-training preference evaluation.")
    beta: Annotated[float, at.Gt(0)] = opt(
        0.1, "DPO beta (implicit reward = beta * log pi/pi_ref). 0.1, not the public 7B recipe's 0.01: at the "
             "LoRA lr it keeps the teacher near its reference (see `train.config.DPOTeacherConfig`).")
    learning_rate: Annotated[float, at.Gt(0)] = opt(
        5e-5, "Learning rate: 5e-5 for a small LoRA teacher on CPU (the public 7B full fine-tune used 5e-7).",
        flags=("--lr", "--learning-rate"))
    loss_type: str = opt("sigmoid", "TRL DPO loss: sigmoid (DPO), ipo, hinge, robust, ... (DPOConfig.loss_type).")
    append_eos: bool = opt(False, "End chosen and rejected with EOS (off: the caches and the preference eval score "
                                  "completions without EOS, so the teacher's reward is the one they read).")
    save_merged: bool = opt(True, "Save merged full weights (a teacher for `curate cache-logits --teacher <run>`).")
    evaluate: bool = opt(True, "Preference accuracy and reward margins on the eval split after training.",
                         flags=("--eval/--no-eval",))

    def validate(self) -> None:
        super().validate()
        if self.student_layers:
            raise ConfigError("student_layers", "DPO starts from the reference as it is (prune in its SFT run)")
        if self.use_lora and not self.save_merged:
            from pathlib import Path

            if (Path(self.model) / "run.json").is_file() and not (Path(self.model) / "merged").is_dir():
                raise ConfigError("save_merged", f"{self.model} has no merged weights, so the adapter of a DPO run "
                                                 "on it cannot be reloaded alone: keep --save-merged")


@dataclass
class PreferenceDistillConfig(TrainConfig):
    """Shared by DCKD and ADPA: a student distilled from a DPO teacher's caches on preference pairs."""

    # Trained on the caches' own token ids, so the template is theirs; another value is refused.
    template: Template | None = opt(None, "Must match the cache's template (default: the cache's).")
    train_split: str = opt("train", "Split of the pairs to train on.")
    eval_split: str = opt("test", "Held-out pairs (preference accuracy) and the DFAR split for accuracy / F1.")
    on_policy: bool = opt(False, "Replace each rejected response by a fresh sample of the student, scored by the "
                                 "teacher (and the reference) during training (slower; needs --teacher-model).")
    teacher_model: str | None = opt(None, "With --on-policy: the DPO teacher run (its merged weights).")
    reference_model: str | None = opt(None, "With --on-policy (ADPA): the teacher's reference (SFT) run.")
    top_k: Annotated[int, at.Ge(1)] = opt(50, "With --on-policy: teacher ids kept per sampled token.")
    sample_max_new_tokens: PositiveInt = opt(48, "With --on-policy: tokens per sampled rejected response.")
    sample_temperature: Annotated[float, at.Ge(0)] = opt(1.0, "With --on-policy: sampling temperature (0: greedy).")

    def validate(self) -> None:
        super().validate()
        if self.on_policy and not self.teacher_model:
            raise ConfigError("teacher_model", "--on-policy scores the student's samples: give --teacher-model")


@dataclass
class DCKDConfig(PreferenceDistillConfig):
    """Dual-Constrained KD: NLL(chosen) + alpha·KL(teacher ‖ student on chosen) + beta·KL(… on rejected)."""

    method: str = opt("dckd", "Training method (set by the command).", cli=False, fixed=True)
    cache: str = opt("preferences-sides-logits", "DPO-teacher cache of the preference sides (name or name@tag).")
    alpha: Annotated[float, at.Ge(0)] = opt(0.1, "Weight of the KL on chosen tokens.")
    beta: Annotated[float, at.Ge(0)] = opt(0.1, "Weight of the KL on rejected tokens.")


@dataclass
class ADPAConfig(PreferenceDistillConfig):
    """Advantage-guided distillation: NLL(chosen) - gamma · mean over rejected tokens of sum_k q_S · A."""

    method: str = opt("adpa", "Training method (set by the command).", cli=False, fixed=True)
    advantage: str = opt("preferences-sides-logits-advantage", "Advantage version (curate build advantage).")
    gamma: Annotated[float, at.Ge(0)] = opt(1.6, "Weight of the advantage term on rejected tokens.")
    advantage_clamp: Literal["none", "reference"] = opt(
        "none", "none: the published formula; reference: the public code's clamp of q_S and A to [1e-8, 1-1e-8] "
                "(negative advantages count ~0, large ones saturate).")
    init: str | None = opt(None, "Start from this run (the DCKD student: ADPA+) instead of --model.")

    def validate(self) -> None:
        super().validate()
        if self.on_policy and not self.reference_model:
            raise ConfigError("reference_model", "--on-policy ADPA needs the teacher's reference for the advantage: "
                                                 "give --reference-model (the SFT run the DPO teacher started from)")


def parse_value(text: str) -> Any:
    """`--set key=value` values are YAML scalars/lists: 3, 0.5, true, null, [q_proj, v_proj]."""
    return yaml.safe_load(text) if text != "" else ""


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["ADPAConfig", "DCKDConfig", "DPOTeacherConfig", "KDConfig", "PreferenceDistillConfig", "RLSageConfig",
           "RUN_CONTROL", "SFTConfig", "TrainConfig", "dump_config", "load_config", "parse_value"]
