"""Students and trained runs as models: loading (with the 8/4-bit decision), layer pruning, LoRA, and
rebuilding a trained run (base + adapter) for evaluation or as a teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.models import ModelRef, QuantDecision, load_causal_lm, load_tokenizer

RUN_FILE = "run.json"


def check_model_spec(spec: str) -> None:
    """Refuse at once a spec that names a local path (starts with / . ~, ends with .gguf, has more than one
    `/`, or its first folder exists here, as `runs/` does) that does not exist, instead of trying it as a
    Hub id with network retries."""
    p = Path(spec).expanduser()
    if p.exists():
        return
    first = Path(p.parts[0]) if len(p.parts) > 1 else None
    if (spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
            or (first is not None and (first.is_dir() or first.name == "runs"))):
        raise CurateError(f"no such run folder or model path: {spec}")


def model_ref(spec: str, gguf_file: str | None = None, revision: str | None = None) -> ModelRef:
    """A run folder's merged weights, else whatever `ModelRef.parse` understands."""
    p = Path(spec)
    if (p / RUN_FILE).is_file() and (p / "merged").is_dir():
        return ModelRef(str((p / "merged").resolve()))
    if (p / RUN_FILE).is_file():
        raise CurateError(f"{p} is a run folder without merged weights; rerun it with --save-merged, or evaluate "
                          f"it directly with `curate eval --model {p}`")
    return ModelRef.parse(spec, gguf_file, revision)


def clear_gguf_marker(model: Any) -> None:
    """transformers dequantizes GGUF checkpoints to float on load but still marks the model as GGUF-quantized,
    which Trainer refuses to train and save_pretrained would record; the weights are plain floats, so drop it."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", "")).lower()
    if quantizer is not None and "gguf" in method:
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def keep_layers(model: Any, n: int) -> list[int]:
    """Keep ``n`` evenly spaced decoder layers (first and last included): a smaller student that starts
    from its teacher's weights. Returns the kept indices (recorded in the run)."""
    layers = model.model.layers
    total = len(layers)
    if n > total:
        raise CurateError(f"student_layers {n} exceeds the model's {total} layers")
    if n == total:
        return list(range(total))
    idx = sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(n)}) if n > 1 else [0]
    import torch

    model.model.layers = torch.nn.ModuleList([layers[i] for i in idx])
    for new, layer in enumerate(model.model.layers):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new  # KV-cache slot during generation
    model.config.num_hidden_layers = len(idx)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in idx]
    return idx


def add_lora(model: Any, *, r: int, alpha: int, dropout: float, target_modules: list[str] | str,
             quantized: bool) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise CurateError(f"LoRA could not be applied: {str(e).splitlines()[0]}") from None


def load_student(cfg: Any, tokenizer: Any | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model ready to train, tokenizer, facts for the run record) from a `TrainConfig`."""
    ref = model_ref(cfg.model, cfg.gguf_file, cfg.revision)
    quant = cfg.weight_quantization(strict=False)  # training never refuses to start: a warning and full precision
    tok = tokenizer if tokenizer is not None else load_tokenizer(ref)
    # Trainer / accelerate place the model (one device per process); quantised loads use device_map.
    model = load_causal_lm(ref, dtype=cfg.dtype, device="cpu", quant=quant)
    clear_gguf_marker(model)
    facts: dict[str, Any] = {"model": ref.describe(), "model_location": ref.location, "model_gguf": ref.gguf_file,
                             "quantization": quant.mode, "quantization_reason": quant.reason}
    if cfg.student_layers:
        facts["kept_layers"] = keep_layers(model, cfg.student_layers)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.use_lora:
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=cfg.lora_target_modules, quantized=quant.mode != "none")
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    if hasattr(model, "get_nb_trainable_parameters"):  # peft and transformers count 4-bit weights at full size
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    facts.update(trainable_params=trainable, total_params=total, layers=model.config.num_hidden_layers)
    return model, tok, facts


def run_tokenizer(run_dir: str | Path) -> Any:
    """A trained run's tokenizer without its weights (the one `load_run` returns)."""
    run = Path(run_dir)
    if (run / "merged").is_dir():
        return load_tokenizer(ModelRef(str((run / "merged").resolve())))
    if not (run / "adapter").is_dir():
        raise CurateError(f"{run} has no adapter/ or merged/ folder: the run did not finish (resume it)")
    return load_tokenizer(ModelRef(str(run / "adapter")))


def load_run(run_dir: str | Path, *, device: str = "auto", dtype: str = "auto",
             quant: QuantDecision | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """A trained run as an inference model: merged weights if saved (always for full fine-tuning), else the
    base model (pruned the same way) with the LoRA adapter merged in. ``quant`` applies to merged weights
    (an adapter is merged into full-precision base weights)."""
    import torch

    run = Path(run_dir)
    info = json.loads((run / RUN_FILE).read_text())
    tok = run_tokenizer(run)  # also refuses a run with neither merged/ nor adapter/, before any weights load
    if (run / "merged").is_dir():
        model = load_causal_lm(ModelRef(str((run / "merged").resolve())), dtype=dtype, device=device, quant=quant)
        return model, tok, info
    adapter = run / "adapter"
    from peft import PeftModel

    model = load_causal_lm(ModelRef(info["model_location"], info.get("model_gguf")), dtype=dtype, device="cpu")
    clear_gguf_marker(model)
    if info["config"].get("student_layers"):
        keep_layers(model, info["config"]["student_layers"])
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.to(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, tok, info
