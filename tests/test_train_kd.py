"""Offline KD from a real teacher-logit cache (built by the cache builder from a tiny random teacher):
loss going down in both targets, the refusals that must happen before any step, and SFT/cache id parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from curate.errors import CurateError
from curate.store import DatasetStore
from tests.tiny import tiny_kd_store, tiny_llama, write_tiny_dfar
from train.config import KDConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

QUICK = dict(max_steps=20, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=50, max_length=64,
             eval_limit=4, gen_max_new_tokens=4, lora_r=8, lora_alpha=16, lora_dropout=0.0, evaluate=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tok) -> dict[str, Path]:
    """A tiny DFAR version, a tiny student folder and a k=16 cache from a different, sharpened tiny teacher."""
    return tiny_kd_store(tmp_path_factory.mktemp("kd"), tok, n_train=32, k=16, max_length=64, sharpen=40.0)


def _cfg(world: dict[str, Path], run_dir: Path, **kw) -> KDConfig:
    values = {**QUICK, "model": str(world["student"]), "store": str(world["store"]), "run_dir": str(run_dir), **kw}
    return load_config(KDConfig, None, values)


def _losses(metrics: dict, key: str = "loss") -> list[float]:
    return [r[key] for r in metrics["log_history"] if key in r and "eval_loss" not in r and "train_loss" not in r]


def test_twenty_steps_of_token_kd_reduce_training_loss(world: dict[str, Path], tmp_path: Path, tok) -> None:
    from train.kd import run_kd

    result = run_kd(_cfg(world, tmp_path / "run", evaluate=True, eval_limit=4), tokenizer=tok)
    losses = _losses(result.metrics)
    assert len(losses) == 20
    assert all(x > 0 for x in _losses(result.metrics, "kd"))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    used = json.loads((result.run.path / "datasets.json").read_text())
    assert [d["name"] for d in used] == ["dfar-lr-logits", "dfar"]
    info = json.loads((result.run.path / "run.json").read_text())
    assert info["cache_k"] == 16 and info["template"] == "plain"
    assert result.metrics["eval"]["n"] == 4  # evaluated on the parent's test split
    # the training prompts are found through the cache's row ids in its parent: none of them is a test prompt
    overlap = result.metrics["eval"]["train_overlap"]
    assert overlap["train"] == "dfar@v1 lr/train via dfar-lr-logits@v1" and overlap["rows"] == 0
    from train.evaluate import training_data

    trained = training_data(result.run.path, DatasetStore(world["store"]), ["ethical", "unethical"])
    train_rows = DatasetStore(world["store"]).get("dfar").read("lr", "train")
    assert trained is not None and trained.prompts == set(train_rows["prompt"].to_pylist())
    assert not trained.label_only
    assert (result.run.path / "plots" / "loss.png").is_file()
    assert "knowledge-distillation" in (result.run.path / "README.md").read_text()


def test_pure_distillation_moves_the_student_towards_the_teacher(world: dict[str, Path], tmp_path: Path,
                                                                 tok) -> None:
    """alpha = 0: only T²·KL on the sparse cache rows; the KD term itself must fall."""
    from train.kd import run_kd

    result = run_kd(_cfg(world, tmp_path / "run", alpha=0.0, use_lora=False, learning_rate=3e-3), tokenizer=tok)
    kd = _losses(result.metrics, "kd")
    assert len(kd) == 20
    assert sum(kd[-3:]) / 3 < 0.9 * sum(kd[:3]) / 3, kd
    assert (result.run.path / "merged" / "model.safetensors").is_file()  # full fine-tuning saves whole weights


def test_label_kd_and_the_no_teacher_baseline_run(world: dict[str, Path], tmp_path: Path, tok) -> None:
    from train.kd import run_kd

    labels = run_kd(_cfg(world, tmp_path / "labels", kd_target="labels", loss="jsd", max_steps=6), tokenizer=tok)
    kd = _losses(labels.metrics, "kd")
    assert len(kd) == 6 and all(x > 0 for x in kd)
    baseline = run_kd(_cfg(world, tmp_path / "ce", alpha=1.0, max_steps=3), tokenizer=tok)
    assert all(x == 0 for x in _losses(baseline.metrics, "kd"))
    assert _losses(baseline.metrics) == pytest.approx(_losses(baseline.metrics, "ce"))


def test_student_with_another_tokenizer_is_refused_before_any_step(world: dict[str, Path], tmp_path: Path,
                                                                   tok) -> None:
    from train.kd import run_kd

    other = tmp_path / "other"
    shutil.copytree(world["student"], other)
    from transformers import AutoTokenizer

    t2 = AutoTokenizer.from_pretrained(other)
    t2.add_tokens(["<|ethics|>"])
    t2.save_pretrained(other)
    with pytest.raises(CurateError, match="fingerprint"):
        run_kd(_cfg(world, tmp_path / "run", model=str(other)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cache_whose_parent_is_missing_gives_a_clear_error(world: dict[str, Path], tmp_path: Path, tok) -> None:
    from train.kd import run_kd

    lonely = tmp_path / "lonely"
    shutil.copytree(Path(world["store"]) / "datasets" / "dfar-lr-logits", lonely / "datasets" / "dfar-lr-logits")
    with pytest.raises(CurateError, match=r"computed from dfar@v1 .*not in store"):
        run_kd(_cfg(world, tmp_path / "run", store=str(lonely)), tokenizer=tok)


def test_sft_tokenization_matches_the_cache(world: dict[str, Path], tok) -> None:
    """The same row gives the same ids to an SFT run and to the cache the KD student reads."""
    from curate.logit_codec import load_cache
    from train.data import tokenize_rows

    store = DatasetStore(world["store"])
    rows = store.get("dfar").read("lr", "train").slice(0, 5).to_pydict()
    cached = load_cache(store.get("dfar-lr-logits"), "train")[:5]
    sft = tokenize_rows(tok, rows["prompt"], rows["completion"], template="plain", max_length=64,
                        append_eos=False)
    for ex, c in zip(sft.examples, cached, strict=True):
        assert ex["input_ids"] == c.input_ids.tolist()
        assert ex["labels"].count(-100) == c.prompt_len


def test_cli_kd_and_bad_options(world: dict[str, Path], tmp_path: Path) -> None:
    from curate.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["train", "kd", "--model", str(world["student"]), "--store", str(world["store"]),
                             "--max-steps", "2", "--batch-size", "2", "--limit", "4", "--no-eval", "--loss",
                             "reverse_kl", "--lr", "5e-5", "--run-dir", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    assert "note:" not in ok.output  # nothing to say about this run
    assert "distilling from dfar-lr-logits@v1" in ok.output  # the cache the default name resolved to, said
    logged = json.loads((tmp_path / "r" / "metrics.json").read_text())["log_history"][0]["learning_rate"]
    assert 0 < logged < 1e-4 and f"'learning_rate': {float(f'{logged:.4g}')}" in ok.output  # not rounded to 0.0001

    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits

    cache_teacher_logits(DatasetStore(world["store"]),  # the student's own logits, with tail draws
                         LogitCacheConfig(dataset="dfar", config="lr", model=str(world["student"]), k=16,
                                          max_length=64, tail_samples=2, limit=4, name="tail-logits"), progress=False)
    noted = runner.invoke(app, ["train", "kd", "--model", str(world["student"]), "--store", str(world["store"]),
                                "--cache", "tail-logits", "--max-steps", "1", "--batch-size", "2", "--no-eval",
                                "--temperature", "2", "--run-dir", str(tmp_path / "t")])
    assert noted.exit_code == 0, noted.output
    notes = json.loads((tmp_path / "t" / "metrics.json").read_text())["notes"]
    assert any("tail draws" in n for n in notes)
    shown = " ".join(noted.output.split())  # the console wraps long lines
    assert all(f"note: {' '.join(n.split())}" in shown for n in notes), noted.output
    typo = runner.invoke(app, ["train", "kd", "--model", str(tmp_path / "studnet"), "--store", str(world["store"]),
                               "--max-steps", "1", "--run-dir", str(tmp_path / "typo")])
    assert typo.exit_code == 1 and typo.output.strip().endswith(f"no such model file or folder: {tmp_path / 'studnet'}")
    wrong = runner.invoke(app, ["train", "kd", "--store", str(world["store"]), "--cache", "dfar-lr-logits@v9"])
    assert wrong.exit_code == 1 and "has no version 'v9' (versions: v1)" in wrong.output
    assert "write a teacher-logit cache first" not in wrong.output  # the cache exists, the version does not
    bad = runner.invoke(app, ["train", "kd", "--store", str(world["store"]), "--alpha", "1.5"])
    assert bad.exit_code == 1 and "alpha must be in [0, 1]" in bad.output
    bad = runner.invoke(app, ["train", "kd", "--store", str(world["store"]), "--kd-target", "logits"])
    assert bad.exit_code == 1 and "kd_target must be one of" in bad.output


@pytest.fixture(scope="module")
def self_cache(tmp_path_factory: pytest.TempPathFactory, tok) -> dict[str, Path]:
    """A sharpened tiny model whose own logits are cached (fp16, k=16) by the real builder, loaded from its folder."""
    from builders.dfar import build_dfar
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits

    root = tmp_path_factory.mktemp("self-kd")
    store = DatasetStore(root / "store")
    build_dfar(store, write_tiny_dfar(root / "src", 8, 4))
    model = tiny_llama(len(tok), hidden=32, seed=3, pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # sharp distributions, so neighbouring positions disagree strongly
        model.model.norm.weight.mul_(40.0)
    folder = root / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    params = LogitCacheConfig(dataset="dfar", config="lr", splits=["train"], model=str(folder), k=16,
                              quantization="fp16", max_length=64, batch_size=4, chunk_size=8, dtype="float32",
                              device="cpu")
    cache_teacher_logits(store, params, tokenizer=tok, progress=False)
    return {"store": store.root, "model": folder}


def test_distilling_a_model_into_itself_has_zero_kd_at_step_zero(self_cache: dict[str, Path], tmp_path: Path,
                                                                 tok) -> None:
    """Cache rows and student logits line up: the student *is* the teacher, so the first KD term is ~0 (fp16
    cache rounding only), while the same rows read one position off give a KD term orders of magnitude larger."""
    from curate.logit_codec import load_cache
    from train.kd import ce_and_distillation, run_kd
    from train.kd_data import KDCollator, kd_features
    from train.losses import get_loss
    from train.modeling import load_student
    from train.token_rows import logprobs_at, supervised_positions

    cfg = load_config(KDConfig, None, {**QUICK, "model": str(self_cache["model"]), "store": str(self_cache["store"]),
                                       "run_dir": str(tmp_path / "run"), "alpha": 0.0, "max_steps": 1,
                                       "batch_size": 8, "use_lora": False, "dtype": "float32", "temperature": 2.0})
    result = run_kd(cfg, tokenizer=tok)
    first_kd = _losses(result.metrics, "kd")[0]
    assert 0 <= first_kd < 1e-5, first_kd  # measured 2.5e-7; one position off: ~36

    model, _, _ = load_student(cfg, tok)
    model.eval()
    feats = [kd_features(e, 64) for e in load_cache(DatasetStore(self_cache["store"]).get("dfar-lr-logits"),
                                                     "train")]
    batch = KDCollator(tok.pad_token_id, num_labels=2)([f for f in feats if f is not None])
    rows, pos, targets = supervised_positions(batch["labels"])
    with torch.no_grad():
        logprobs = logprobs_at(model, batch["input_ids"], batch["attention_mask"], rows, pos)
    kd_loss = get_loss(cfg.loss)

    def kd_with_shift(shift: int) -> float:
        keep = (pos - batch["answer_pos"][rows] - shift >= 0) & (pos - batch["answer_pos"][rows] - shift
                                                                 < (batch["labels"] != -100).sum(-1)[rows])
        shifted = {**batch, "answer_pos": batch["answer_pos"] + shift}
        _, kd = ce_and_distillation(logprobs[keep], rows[keep], pos[keep], targets[keep], shifted, kd_loss=kd_loss,
                                    temperature=cfg.temperature)
        return float(kd)

    assert kd_with_shift(0) == pytest.approx(first_kd, rel=1e-3, abs=1e-6)
    for shift in (-1, 1):
        assert kd_with_shift(shift) > 1.0, shift
