"""The run folder: everything needed to trust, replay and reuse a training run, in one place.

    <run>/config.yaml        resolved config (replay with --config)
    <run>/datasets.json      dataset / cache versions used, by content hash
    <run>/run.json           facts for reloading: base model location, kept layers, tokenizer fingerprint
    <run>/metrics.json       train summary, log history, evaluation metrics
    <run>/adapter/           LoRA adapter + tokenizer      (merged/ for full fine-tuning or --save-merged)
    <run>/checkpoints/       Trainer checkpoints (resume with --resume)
    <run>/plots/*.png        loss / eval curves, confusion matrix
    <run>/README.md          model card (cards/model_card.md.j2)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from train.config import TrainConfig, dump_config

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def default_name(cfg: TrainConfig, data_label: str) -> str:
    """Deterministic (every process of a multi-GPU launch computes the same): method, data, config hash."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", data_label).strip("-")
    return f"{cfg.method}-{safe}-{cfg.identity()}"


@dataclass
class RunFolder:
    path: Path

    @classmethod
    def prepare(cls, cfg: TrainConfig, data_label: str, *, is_main: bool | None = None) -> RunFolder:
        """Create (or reopen with --resume / wipe with --overwrite) the run's folder.

        Under torchrun / accelerate only rank 0 checks and creates it; the other ranks just get the path.
        """
        path = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.runs_dir) / default_name(cfg, data_label)
        path = path.resolve()
        run = cls(path)
        if is_main is None:
            is_main = os.environ.get("RANK", "0") == "0"
        if not is_main:
            return run
        if path.exists() and any(path.iterdir()):
            if cfg.resume:
                if run.latest_checkpoint() is None:
                    raise CurateError(f"--resume: {path} has no checkpoint to resume from")
            elif cfg.overwrite:
                shutil.rmtree(path)
            else:
                raise CurateError(f"run folder {path} already exists: pass --resume to continue it, --overwrite to "
                                  "start again, or --run-dir for a new folder")
        elif cfg.resume:
            raise CurateError(f"--resume: run folder {path} does not exist")
        path.mkdir(parents=True, exist_ok=True)
        return run

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

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
        return max(found)[1] if found else None

    def write_json(self, name: str, obj: Any) -> Path:
        return self._write(name, json.dumps(obj, indent=2, default=str) + "\n")

    def write_config(self, cfg: TrainConfig) -> Path:
        return self._write("config.yaml", dump_config(cfg))

    def _write(self, name: str, text: str) -> Path:
        dest = self.path / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(text)
        os.replace(tmp, dest)
        return dest

    def write_card(self, context: dict[str, Any]) -> Path:
        from curate.cards import render_model_card

        return self._write("README.md", render_model_card(context, "model_card.md.j2"))


def version_record(version: Any, config: str | None = None, splits: dict[str, int] | None = None) -> dict[str, Any]:
    """How a run names a dataset version it used: by content hash (tags are local to a store)."""
    return {"name": version.name, "tag": version.tag, "content_hash": version.hash, "config": config,
            "rows_used": splits or {}}
