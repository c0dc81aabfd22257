"""The real student: SmolLM2-135M-Instruct from its GGUF (dequantised by transformers) trains with LoRA,
saves an adapter and reloads for evaluation. Slow: loads the weights (~15 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import smollm2_tokenizer, write_tiny_dfar

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.slow
def test_smollm2_gguf_student_trains_saves_and_reloads(tmp_path: Path) -> None:
    from builders.dfar import build_dfar
    from curate.store import DatasetStore
    from train.config import SFTConfig
    from train.modeling import load_run
    from train.sft import run_sft

    store = DatasetStore(tmp_path / "store")
    build_dfar(store, write_tiny_dfar(tmp_path / "src", 8, 4))
    tok = smollm2_tokenizer()
    cpu_only = not torch.cuda.is_available()
    cfg = SFTConfig(model="smollm2", store=str(store.root), dataset_config="l", max_steps=2, batch_size=2,
                    max_length=64, lora_r=4, lora_alpha=8, evaluate=False, logging_steps=1,
                    run_dir=str(tmp_path / "run"), load_in_8bit=cpu_only)
    result = run_sft(cfg, tokenizer=tok)
    assert result.metrics["train"]["global_step"] == 2
    info = json.loads((result.run.path / "run.json").read_text())
    if cpu_only:  # 8-bit asked on CPU: a clear message and full precision, never a refusal
        assert info["quantization"] == "none" and "needs a CUDA GPU" in info["quantization_reason"]
    assert "SmolLM2-135M-Instruct" in info["model"]
    model, rtok, _ = load_run(result.run.path, device="cpu")
    assert model.config.num_hidden_layers == 30 and len(rtok) == len(tok)
