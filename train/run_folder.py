"""The run folder: everything needed to trust, replay and reuse a training run, in one place.

    <run>/config.yaml        resolved config the run started with (replay with --config)
    <run>/datasets.json      dataset / cache versions used, by content hash
    <run>/run.json           facts for reloading (base model location, kept layers, tokenizer fingerprint) and
                             the run's segments: one per start or --resume, with any option changed on resume
    <run>/config.segment-N.yaml  the config of segment N when `--resume --allow-changes` changed options
    <run>/metrics.json       train summary, log history, evaluation metrics
    <run>/adapter/           LoRA adapter + tokenizer      (merged/ for full fine-tuning or --save-merged)
    <run>/checkpoints/       Trainer checkpoints (resume with --resume; only complete ones count)
    <run>/plots/*.png        loss / eval curves, confusion matrix
    <run>/README.md          model card (cards/model_card.md.j2)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from curate.atomic import atomic_write_text
from curate.errors import CurateError
from train.config import RUN_CONTROL, TrainConfig, dump_config

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Per-invocation switches: never part of what a run computed, so never compared on resume nor written to config.yaml.
INVOCATION = frozenset({"resume", "overwrite", "allow_changes"})
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", "adapter_model.bin",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def default_name(cfg: TrainConfig, data_label: str) -> str:
    """Deterministic (every process of a multi-GPU launch computes the same): method, data, config hash."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", data_label).strip("-")
    return f"{cfg.method}-{safe}-{cfg.identity()}"


def checkpoint_complete(folder: Path) -> bool:
    """Trainer writes weights, then optimizer / scheduler / RNG, and `trainer_state.json` last: a checkpoint
    counts only when that state parses and names this step and the weights and optimizer files are there (a
    kill during the save, or during the rotation that deletes old checkpoints, leaves one that does not)."""
    m = CHECKPOINT_RE.match(folder.name)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if m is None or not isinstance(state, dict) or state.get("global_step") != int(m.group(1)):
        return False
    has_weights = any((folder / f).is_file() and (folder / f).stat().st_size > 0 for f in WEIGHT_FILES)
    return has_weights and (folder / "optimizer.pt").is_file() and (folder / "scheduler.pt").is_file()


def _plain(value: Any) -> Any:
    """A config value as YAML gives it back (tuples become lists ...), so recorded and new values compare."""
    return yaml.safe_load(yaml.safe_dump(value))


def config_changes(recorded: dict[str, Any], cfg: TrainConfig) -> dict[str, list[Any]]:
    """{option: [recorded, now]} for every option that changes what the run computes."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    changes = {}
    for key, now in cfg.to_dict().items():
        if key in RUN_CONTROL or key in INVOCATION:
            continue
        before = recorded.get(key, defaults.get(key))
        if _plain(before) != _plain(now):
            changes[key] = [before, now]
    return changes


@dataclass
class RunFolder:
    path: Path
    resume_from: Path | None = None  # the complete checkpoint a --resume continues from
    changes: dict[str, list[Any]] = field(default_factory=dict)  # options changed on resume (--allow-changes)
    # --overwrite of an existing run: emptied by `start`, after every check of the data and options has passed,
    # so a refused start (a typo in the cache name, a tokenizer mismatch) loses nothing
    overwrite_pending: bool = False
    # (step, final step) when --resume finds the run already trained to its end with its results saved: there is
    # nothing to continue, so the trainer returns the recorded results (`runner.finished_result`), not retraining
    finished_at: tuple[int, int] | None = None

    @classmethod
    def prepare(cls, cfg: TrainConfig, data_label: str, *, is_main: bool | None = None) -> RunFolder:
        """Check the run's folder: new (made by `start`), reopened with --resume, or marked for wiping with
        --overwrite (done by `start`).

        --resume continues from the newest *complete* checkpoint and refuses options that differ from the
        run's recorded config unless `allow_changes` (then they become a new segment in run.json).
        Under torchrun / accelerate only rank 0 checks it (and `start` creates it); the other ranks just get the path.
        """
        path = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.runs_dir) / default_name(cfg, data_label)
        path = path.resolve()
        run = cls(path)
        if is_main is None:
            from accelerate import PartialState

            is_main = PartialState().is_main_process
        if cfg.resume:
            run.resume_from = run.latest_checkpoint()
        if not is_main:
            run.finished_at = run.finished(cfg)  # every rank must skip training, or the others wait on rank 0
            return run
        if path.exists() and any(path.iterdir()):
            if cfg.resume:
                run._check_resume(cfg)
                run.finished_at = run.finished(cfg)
            elif cfg.overwrite:
                run.overwrite_pending = True
            else:
                raise CurateError(f"run folder {path} already exists: pass --resume to continue it, --overwrite to "
                                  "start again, or --run-dir for a new folder")
        elif cfg.resume:
            raise CurateError(f"--resume: run folder {path} does not exist")
        return run  # a new run's folder is made by `start`: a run refused before then leaves none behind

    def _check_resume(self, cfg: TrainConfig) -> None:
        if self.resume_from is None:
            partial = [p.name for p in self.checkpoint_dirs() if not checkpoint_complete(p)]
            extra = f" ({', '.join(partial)} incomplete: killed while saving)" if partial else ""
            raise CurateError(f"--resume: {self.path} has no complete checkpoint to resume from{extra}; start "
                              "again with --overwrite")
        recorded = self.effective_config()
        if recorded is None:
            log.warning("%s has no config.yaml: resuming without checking the options", self.path)
            return
        self.changes = config_changes(recorded, cfg)
        if self.changes and not getattr(cfg, "allow_changes", False):
            diff = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in self.changes.items())
            raise CurateError(f"--resume with options that differ from {self.config_file().name} of {self.path}: "
                              f"{diff}; resume with the run's own options ({self.resume_command(cfg.method)}) or "
                              "pass --allow-changes to record them as a new segment")
        for p in self.checkpoint_dirs():
            if not checkpoint_complete(p) and int(CHECKPOINT_RE.match(p.name).group(1)) > self.resume_step:
                log.warning("removing %s: incomplete (killed while saving); resuming from %s", p, self.resume_from.name)
                shutil.rmtree(p)  # Trainer would write into it (or rotate good checkpoints out for it)

    def finished(self, cfg: TrainConfig) -> tuple[int, int] | None:
        """(step, final step) when the checkpoint --resume would continue from already is the run's last step
        and that step's results are saved (metrics.json naming it, the card, the weights); None otherwise.

        Judged from what the run recorded, no marker of its own: the checkpoint's trainer_state.json (its
        step, and its max_steps when the run is sized by --epochs), metrics.json's train.global_step (written
        after the weights, so a run killed while evaluating is still resumed to finish its outputs). A raised
        --max-steps (or, with --epochs, any changed option) means there is more to train: not finished."""
        if self.resume_from is None:
            return None
        try:
            state = json.loads((self.resume_from / "trainer_state.json").read_text())
            metrics = self.read_json("metrics.json")
        except (OSError, ValueError):
            return None
        step = state.get("global_step")
        if cfg.max_steps > 0:
            final = cfg.max_steps  # Trainer stops at max_steps whatever --epochs says
        else:
            recorded = self.effective_config()
            if recorded is None or config_changes(recorded, cfg):
                return None  # the number of steps --epochs gives may differ now: let Trainer decide
            final = state.get("max_steps")
        if not isinstance(step, int) or not isinstance(final, int) or final <= 0 or step < final:
            return None
        if not isinstance(metrics, dict) or (metrics.get("train") or {}).get("global_step") != step:
            return None
        if not (self.path / "README.md").is_file() or not self.has_model(cfg):
            return None
        return step, final

    def has_model(self, cfg: TrainConfig) -> bool:
        """The trained weights `train_and_save` writes for this config are there (adapter/, merged/ or both)."""
        lora = getattr(cfg, "use_lora", True)
        wanted = ([self.adapter] if lora else []) + ([self.merged] if not lora or getattr(cfg, "save_merged", False)
                                                    else [])
        return all(any((d / f).is_file() for f in WEIGHT_FILES) for d in wanted)

    def finished_message(self) -> str:
        """One line for a --resume that finds nothing to do, with the two ways to do something."""
        step, final = self.finished_at or (self.resume_step, self.resume_step)
        return (f"already finished at step {step}/{final}: nothing to resume in {self.path}; use --overwrite to "
                "train again (or --max-steps N --allow-changes to train further)")

    @property
    def resume_step(self) -> int:
        return int(CHECKPOINT_RE.match(self.resume_from.name).group(1)) if self.resume_from else 0

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def checkpoint_dirs(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted((p for p in self.checkpoints.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)),
                      key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (`transformers.trainer_utils.get_last_checkpoint` takes the highest
        number whether or not its save finished)."""
        done = [p for p in self.checkpoint_dirs() if checkpoint_complete(p)]
        return done[-1] if done else None

    def read_json(self, name: str) -> Any:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None

    def segments(self) -> list[dict[str, Any]]:
        info = self.read_json("run.json") or {}
        return list(info.get("segments") or [])

    def config_file(self) -> Path:
        """The config the run's latest segment trained with (config.yaml unless a resume changed options)."""
        changed = [s["config_file"] for s in self.segments() if s.get("config_file")]
        return self.path / (changed[-1] if changed else "config.yaml")

    def effective_config(self) -> dict[str, Any] | None:
        p = self.config_file()
        return yaml.safe_load(p.read_text()) if p.is_file() else None

    def resume_command(self, method: str) -> str:
        """The exact command that continues this run with its own options."""
        sub = method  # each method's command bears its name (sft, kd, rl-sage, dpo, ...); `train lr` records sft
        return shlex.join(["curate", "train", sub, "--config", str(self.config_file()), "--run-dir", str(self.path),
                           "--resume"])

    def start(self, cfg: TrainConfig, datasets: list[dict[str, Any]], facts: dict[str, Any]) -> None:
        """Write the records before the first step: config, datasets and run.json with its first segment; on
        --resume only a new segment (config.yaml and datasets.json keep describing what the run started with;
        data versions that changed since are refused unless `allow_changes`, then recorded in the segment)."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        if self.overwrite_pending:
            shutil.rmtree(self.path)
            self.overwrite_pending = False
        self.path.mkdir(parents=True, exist_ok=True)
        if self.resume_from is None or not (self.path / "run.json").is_file():
            self.write_config(cfg)
            self.write_json("datasets.json", datasets)
            self.write_json("run.json", {**facts, "config": cfg.to_dict(),
                                         "segments": [{"segment": 0, "start_step": 0, "started_at": now}]})
            return
        info = self.read_json("run.json")
        segments = list(info.get("segments") or [{"segment": 0, "start_step": 0}])
        seg: dict[str, Any] = {"segment": len(segments), "start_step": self.resume_step,
                               "resumed_from": str(self.resume_from.relative_to(self.path)), "started_at": now}
        recorded = self.read_json("datasets.json")
        if recorded is not None and _plain(recorded) != _plain(datasets):
            if not getattr(cfg, "allow_changes", False):
                was = ", ".join(f"{d['name']}@{str(d['content_hash'])[:12]} {d.get('rows_used')}" for d in recorded)
                now_ = ", ".join(f"{d['name']}@{str(d['content_hash'])[:12]} {d.get('rows_used')}" for d in datasets)
                raise CurateError(f"--resume: the data differs from {self.path / 'datasets.json'} ({was} -> {now_}); "
                                  "pass --allow-changes to record it as a new segment")
            seg["datasets"] = datasets
        if self.changes:
            seg["changes"] = self.changes
            seg["config_file"] = f"config.segment-{seg['segment']}.yaml"
            self._write(seg["config_file"], dump_config(self._replayable(cfg)))
        info["segments"] = [*segments, seg]
        self.write_json("run.json", info)

    def write_json(self, name: str, obj: Any) -> Path:
        return self._write(name, json.dumps(obj, indent=2, default=str) + "\n")

    @staticmethod
    def _replayable(cfg: TrainConfig) -> TrainConfig:
        """Without per-invocation switches: replaying a config.yaml must not --overwrite the run it describes."""
        names = {f.name for f in dataclasses.fields(cfg)}
        return dataclasses.replace(cfg, **{k: False for k in INVOCATION if k in names})

    def write_config(self, cfg: TrainConfig) -> Path:
        return self._write("config.yaml", dump_config(self._replayable(cfg)))

    def _write(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)

    def write_card(self, context: dict[str, Any]) -> Path:
        from curate.cards import render_model_card

        return self._write("README.md", render_model_card(context, "model_card.md.j2"))


def version_record(version: Any, config: str | None = None, splits: dict[str, int] | None = None) -> dict[str, Any]:
    """How a run names a dataset version it used: by content hash (tags are local to a store)."""
    return {"name": version.name, "tag": version.tag, "content_hash": version.hash, "config": config,
            "rows_used": splits or {}}
