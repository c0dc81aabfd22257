"""Gradient accumulation is a memory knob, not a different objective: one batch of 8 and 4 accumulated
micro-batches of 2 give the same gradients (before clipping) through the Trainer path the toolkit uses,
even when the micro-batches hold different numbers of completion tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny import single_thread, smollm2_tokenizer, tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


PROMPTS = ["Statement: I lied to my boss.\nAnswer:", "Is it fine to steal?\nAnswer:", "Ok?\nAnswer:",
           "Statement: I helped a stranger carry a heavy box up the stairs.\nAnswer:", "Hm?\nAnswer:",
           "Statement: I kept the change.\nAnswer:", "Statement: I recycled.\nAnswer:", "Why?\nAnswer:"]
COMPLETIONS = [" unethical. Reason: it breaks trust and hurts the team.", " unethical", " ethical",
               " ethical. Reason: kind.", " unethical. Reason: it is theft, plain and simple, and it harms.",
               " unethical. Reason: dishonest.", " ethical", " ethical. Reason: it helps everyone."]


def _first_step_grads(tmp_path: Path, batch_size: int, grad_accum: int, packing: bool = False) -> dict[str, Any]:
    """Gradients at the first optimizer step (clipping off), through `training_arguments` + `SFTTrainer`."""
    from transformers import TrainerCallback

    from train.config import SFTConfig
    from train.data import CompletionCollator, ListDataset, pack, tokenize_rows
    from train.run_folder import RunFolder
    from train.runner import training_arguments
    from train.sft import SFTTrainer

    tok = smollm2_tokenizer()
    examples = tokenize_rows(tok, PROMPTS, COMPLETIONS, template="plain", max_length=64, append_eos=True).examples
    if packing:
        examples = pack(examples, 40)
    model = tiny_llama(len(tok), hidden=32, seed=4, pad_token_id=tok.pad_token_id)
    cfg = SFTConfig(batch_size=batch_size, grad_accum=grad_accum, max_steps=1, max_grad_norm=0.0, use_lora=False,
                    learning_rate=1e-3, logging_steps=1, save_steps=100, evaluate=False,
                    run_dir=str(tmp_path / f"run-{batch_size}x{grad_accum}-{packing}"))
    grads: dict[str, Any] = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    run = RunFolder.prepare(cfg, "ga", is_main=True)
    trainer = SFTTrainer(model=model, args=training_arguments(cfg, run, has_eval=False),
                         train_dataset=ListDataset(examples), data_collator=CompletionCollator(tok.pad_token_id),
                         callbacks=[Grab()])
    trainer.train()
    return grads


def test_accumulated_micro_batches_give_the_batch_gradient(tmp_path: Path) -> None:
    full = _first_step_grads(tmp_path, 8, 1)
    accumulated = _first_step_grads(tmp_path, 2, 4)
    assert full.keys() == accumulated.keys() and len(full) > 10
    for name, g in full.items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_packed_batch_gives_the_unpacked_gradient(tmp_path: Path) -> None:
    """Packing through the Trainer (flattened blocks, restarting position ids) changes nothing in the step."""
    full = _first_step_grads(tmp_path, 8, 1)
    packed = _first_step_grads(tmp_path, 8, 1, packing=True)
    for name, g in full.items():
        torch.testing.assert_close(packed[name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("kd_target", ["tokens", "labels"])
def test_kd_accumulation_matches_the_batch_gradient(tmp_path: Path, kd_target: str) -> None:
    from builders.dfar import build_dfar
    from builders.teacher_logits import cache_teacher_logits
    from curate.logit_codec import load_cache
    from curate.store import DatasetStore
    from tests.tiny import write_tiny_dfar
    from train.config import KDConfig
    from train.data import ListDataset
    from train.kd import KDTrainer
    from train.kd_data import KDCollator, kd_features
    from train.losses import get_loss
    from train.run_folder import RunFolder
    from train.runner import training_arguments

    try:
        from builders.teacher_logits import LogitCacheConfig as CacheCfg
    except ImportError:  # before the model-spec restructuring
        from builders.teacher_logits import LogitCacheParams as CacheCfg
    from transformers import TrainerCallback

    tok = smollm2_tokenizer()
    store = DatasetStore(tmp_path / "store")
    build_dfar(store, write_tiny_dfar(tmp_path / "src", 8, 4))
    teacher = tiny_llama(len(tok), hidden=32, seed=5, pad_token_id=tok.pad_token_id).eval()
    cache_teacher_logits(store, CacheCfg(dataset="dfar", config="lr", splits=["train"], k=8, max_length=64,
                                         batch_size=8, chunk_size=8), model=teacher, tokenizer=tok, progress=False)
    cache = store.get("dfar-lr-logits")
    feats = [kd_features(e, 64) for e in load_cache(cache, "train")]
    label_ids = [int(x) for x in cache.manifest["params"]["label_token_ids"]]

    def grads(batch_size: int, grad_accum: int) -> dict[str, Any]:
        model = tiny_llama(len(tok), hidden=32, seed=4, pad_token_id=tok.pad_token_id)
        cfg = KDConfig(batch_size=batch_size, grad_accum=grad_accum, max_steps=1, max_grad_norm=0.0, use_lora=False,
                       logging_steps=1, save_steps=100, evaluate=False, run_dir=str(tmp_path / f"kd-{batch_size}"))
        out: dict[str, Any] = {}

        class Grab(TrainerCallback):
            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                out.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

        run = RunFolder.prepare(cfg, "ga", is_main=True)
        KDTrainer(model=model, args=training_arguments(cfg, run, has_eval=False), train_dataset=ListDataset(feats),
                  data_collator=KDCollator(tok.pad_token_id, num_labels=len(label_ids)), callbacks=[Grab()],
                  kd_loss=get_loss("forward_kl"), alpha=0.5, temperature=2.0, kd_target=kd_target,
                  label_token_ids=label_ids).train()
        return out

    full, accumulated = grads(8, 1), grads(2, 4)
    assert full.keys() == accumulated.keys() and len(full) > 10
    for name, g in full.items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-4, atol=1e-7, msg=name)
