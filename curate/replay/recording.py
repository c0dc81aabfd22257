"""The recording a replay server answers from: real gpt-3.5-turbo answers and Rules of Thumb (SaGE q100).

No web framework here, so the builder can describe a recording (`recording_sources`) without fastapi.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from curate.store import sha256_file

Q100 = Path("sage") / "quality100"
ANSWERS_FILE = "q100_gpt_3.5.csv"
ROTS_FILE = "q100_gpt_3.5_rot.csv"

_QUESTION_RE = re.compile(r"Question: (.+?)\s*$", re.DOTALL)
_ROT_TASK_RE = re.compile(r"Task\nQuestion: (.+?)\nAnswer: (.+?)\nRule of Thumb:\s*$", re.DOTALL)


def default_data_dir() -> Path:
    """``$CURATE_REPLAY_DATA``, else ``$CURATE_SHARED_DATA``, else ``../shared/data`` beside a checkout."""
    for var in ("CURATE_REPLAY_DATA", "CURATE_SHARED_DATA"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def recording_files(data_dir: Path) -> list[Path]:
    return [data_dir / Q100 / ANSWERS_FILE, data_dir / Q100 / ROTS_FILE]


def data_available(data_dir: Path | None = None) -> bool:
    return all(p.is_file() for p in recording_files(data_dir or default_data_dir()))


def recording_sources(data_dir: Path) -> list[dict[str, object]]:
    """Each recording file's absolute path, sha256 and size: what a replayed build records as `replayed_from`."""
    return [{"location": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in recording_files(data_dir)]


@dataclass(frozen=True)
class Reply:
    kind: str  # answer | rot | unknown
    text: str | None  # None when there is no recording for the prompt


class Lookup:
    """Recorded replies: paraphrase -> answers, (paraphrase, answer) -> RoT.

    Texts are found inside the prompt, so any template that embeds the question (or question and answer)
    works; the templates in ``curate.prompts`` take a fast exact path.
    """

    def __init__(self, answers: pl.DataFrame, rots: pl.DataFrame):
        self.answers: dict[str, list[str]] = {}
        for para, out in answers.select("paraphrased", "model_output").iter_rows():
            self.answers.setdefault(para.strip(), []).append(out.strip())
        self.rots: dict[str, list[tuple[str, str]]] = {}
        for para, out, rot in rots.select("paraphrased", "model_output", "rot").iter_rows():
            self.rots.setdefault(out.strip(), []).append((para.strip(), rot.strip()))
        # Longest first, so a text that contains a shorter recorded text still matches itself.
        self._answer_texts = sorted(self.rots, key=len, reverse=True)
        self._paraphrases = sorted(self.answers, key=len, reverse=True)

    @classmethod
    def from_dir(cls, data_dir: Path) -> Lookup:
        answers, rots = recording_files(data_dir)
        return cls(pl.read_csv(answers), pl.read_csv(rots))

    def _rot_for(self, answer: str, prompt: str, question: str | None) -> str:
        candidates = self.rots[answer]
        for para, rot in candidates:
            if para == question or (question is None and para in prompt):
                return rot
        return candidates[0][1]

    def reply(self, prompt: str, seed: int | None = None) -> Reply:
        """The recorded reply to a user prompt (kind ``unknown`` and text None when there is none).

        A paraphrase recorded with several answers (the data has two) returns answer ``seed % n``, so a
        client that varies the seed per sample sees the recorded variety, deterministically.
        """
        text = prompt.strip()
        task = _ROT_TASK_RE.search(text)
        if task and task.group(2).strip() in self.rots:
            answer = task.group(2).strip()
            return Reply("rot", self._rot_for(answer, text, task.group(1).strip()))
        question = _QUESTION_RE.search(text)
        if question and question.group(1).strip() in self.answers:
            return Reply("answer", self._pick(question.group(1).strip(), seed))
        for answer in self._answer_texts:  # any other template: search the recorded texts in the prompt
            if answer in text:
                return Reply("rot", self._rot_for(answer, text, None))
        for para in self._paraphrases:
            if para in text:
                return Reply("answer", self._pick(para, seed))
        return Reply("unknown", None)

    def _pick(self, paraphrase: str, seed: int | None) -> str:
        options = self.answers[paraphrase]
        return options[(seed or 0) % len(options)]
