"""Gradient accumulation is a memory knob, not a different objective: one batch of 8 and 4 accumulated
micro-batches of 2 give the same gradients (before clipping) through the Trainer path the toolkit uses,
even when the micro-batches hold different numbers of completion tokens; packing changes nothing either."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny import smollm2_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


PROMPTS = ["Statement: I lied to my boss.\nAnswer:", "Is it fine to steal?\nAnswer:", "Ok?\nAnswer:",
           "Statement: I helped a stranger carry a heavy box up the stairs.\nAnswer:", "Hm?\nAnswer:",
           "Statement: I kept the change.\nAnswer:", "Statement: I recycled.\nAnswer:", "Why?\nAnswer:"]
COMPLETIONS = [" unethical. Reason: it breaks trust and hurts the team.", " unethical", " ethical",
               " ethical. Reason: kind.", " unethical. Reason: it is theft, plain and simple, and it harms.",
               " unethical. Reason: dishonest.", " ethical", " ethical. Reason: it helps everyone."]


def first_step_grads(cfg: Any, make_trainer: Callable[..., Any]) -> dict[str, torch.Tensor]:
    """Gradients at the first optimizer step of a fresh tiny model (clipping off in `cfg`), with the toolkit's
    `training_arguments`; ``make_trainer(model, args, callbacks)`` builds the method's Trainer."""
    from transformers import TrainerCallback

    from train.run_folder import RunFolder
    from train.runner import training_arguments

    tok = smollm2_tokenizer()
    model = tiny_llama(len(tok), hidden=32, seed=4, pad_token_id=tok.pad_token_id)
    grads: dict[str, torch.Tensor] = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    args = training_arguments(cfg, RunFolder.prepare(cfg, "ga", is_main=True), has_eval=False)
    make_trainer(model, args, [Grab()]).train()
    return grads


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name, g in a.items():
        torch.testing.assert_close(b[name], g, rtol=1e-4, atol=1e-7, msg=name)


def sft_grads(tmp_path: Path, batch_size: int, grad_accum: int, packing: bool = False) -> dict[str, torch.Tensor]:
    from train.config import SFTConfig
    from train.data import CompletionCollator, ListDataset, pack, tokenize_rows
    from train.sft import SFTTrainer

    tok = smollm2_tokenizer()
    examples = tokenize_rows(tok, PROMPTS, COMPLETIONS, template="plain", max_length=64, append_eos=True).examples
    data = ListDataset(pack(examples, 40) if packing else examples)
    cfg = SFTConfig(batch_size=batch_size, grad_accum=grad_accum, max_steps=1, max_grad_norm=0.0, use_lora=False,
                    logging_steps=1, save_steps=100, evaluate=False,
                    run_dir=str(tmp_path / f"sft-{batch_size}x{grad_accum}-{packing}"))
    return first_step_grads(cfg, lambda model, args, callbacks: SFTTrainer(
        model=model, args=args, train_dataset=data, data_collator=CompletionCollator(tok.pad_token_id),
        callbacks=callbacks))


def test_accumulated_micro_batches_give_the_batch_gradient(tmp_path: Path) -> None:
    assert_same(sft_grads(tmp_path, 8, 1), sft_grads(tmp_path, 2, 4))


def test_packed_batch_gives_the_unpacked_gradient(tmp_path: Path) -> None:
    """Packing through the Trainer (flattened blocks, restarting position ids) changes nothing in the step."""
    assert_same(sft_grads(tmp_path, 8, 1), sft_grads(tmp_path, 8, 1, packing=True))


@pytest.mark.parametrize("kd_target", ["tokens", "labels"])
def test_kd_accumulation_matches_the_batch_gradient(tmp_path: Path, kd_target: str) -> None:
    from builders.dfar import build_dfar
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from curate.logit_codec import load_cache
    from curate.store import DatasetStore
    from tests.tiny import write_tiny_dfar
    from train.config import KDConfig
    from train.data import ListDataset
    from train.kd import KDTrainer
    from train.kd_data import KDCollator, kd_features
    from train.losses import get_loss

    tok = smollm2_tokenizer()
    store = DatasetStore(tmp_path / "store")
    build_dfar(store, write_tiny_dfar(tmp_path / "src", 8, 4))
    teacher = tiny_llama(len(tok), hidden=32, seed=5, pad_token_id=tok.pad_token_id).eval()
    cache_teacher_logits(store, LogitCacheConfig(dataset="dfar", config="lr", splits=["train"], k=8, max_length=64,
                                                 batch_size=8, chunk_size=8),
                         model=teacher, tokenizer=tok, progress=False)
    cache = store.get("dfar-lr-logits")
    data = ListDataset([kd_features(e, 64) for e in load_cache(cache, "train")])
    label_ids = [int(x) for x in cache.manifest["params"]["label_token_ids"]]

    def grads(batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
        cfg = KDConfig(batch_size=batch_size, grad_accum=grad_accum, max_steps=1, max_grad_norm=0.0, use_lora=False,
                       logging_steps=1, save_steps=100, evaluate=False, run_dir=str(tmp_path / f"kd-{batch_size}"))
        return first_step_grads(cfg, lambda model, args, callbacks: KDTrainer(
            model=model, args=args, train_dataset=data, callbacks=callbacks,
            data_collator=KDCollator(tok.pad_token_id, num_labels=len(label_ids)), kd_loss=get_loss("forward_kl"),
            alpha=0.5, temperature=2.0, kd_target=kd_target, label_token_ids=label_ids))

    assert_same(grads(8, 1), grads(2, 4))
