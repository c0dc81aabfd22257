"""DCKD and ADPA trainers end to end on tiny random models: tiny DFAR -> preferences (rejected answers from a
tiny model) -> teacher cache of the sides -> reference cache at the teacher's ids -> advantage table -> runs.

Expected values come from dense forward passes of the models in the test, not from the trainer's code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from curate.configs import load_config
from curate.errors import CurateError
from curate.models import ModelRef, load_causal_lm
from curate.store import DatasetStore
from tests.tiny import save_tiny, write_tiny_dfar
from train.config import ADPAConfig, DCKDConfig

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = dict(max_steps=2, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=50, max_length=64,
             eval_limit=4, gen_max_new_tokens=4, lora_r=8, lora_alpha=16, lora_dropout=0.0, evaluate=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> dict[str, Any]:
    from builders.advantage import build_advantage
    from builders.dfar import build_dfar
    from builders.preferences import PreferencesConfig, build_preferences
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits

    root = tmp_path_factory.mktemp("pref")
    store = DatasetStore(root / "store")
    build_dfar(store, write_tiny_dfar(root / "src", 16, 8))
    teacher = save_tiny(root / "teacher", tok, hidden=32, seed=1)
    reference = save_tiny(root / "reference", tok, hidden=32, seed=2)
    with torch.no_grad():  # a sharper teacher than a near-uniform random one, so KL and advantages are not ~0
        m = load_causal_lm(ModelRef.parse(str(teacher)), dtype="float32", device="cpu")
        m.model.norm.weight.mul_(20.0)
        m.save_pretrained(teacher)
    build_preferences(store, PreferencesConfig(from_dataset="dfar", rejected=f"model:{reference}", max_new_tokens=6,
                                               limit=8, device="cpu"))
    common = dict(dataset="preferences", config="sides", k=16, max_length=64, batch_size=8, chunk_size=16,
                  dtype="float32", quantization="fp16")
    cache_teacher_logits(store, LogitCacheConfig(model=str(teacher), name="teacher-logits", **common), progress=False)
    cache_teacher_logits(store, LogitCacheConfig(model=str(reference), name="reference-logits",
                                                 at_ids="teacher-logits", **common), progress=False)
    build_advantage(store, "teacher-logits", "reference-logits", name="advantage")
    return {"root": root, "store": store.root, "teacher": teacher, "reference": reference}


def _cfg(cls: type, world: dict[str, Any], run_dir: Path, **kw: Any) -> Any:
    source = {"cache": "teacher-logits"} if cls is DCKDConfig else {"advantage": "advantage"}
    values = {**QUICK, **source, "model": str(world["teacher"]), "store": str(world["store"]),
              "run_dir": str(run_dir), **kw}
    return load_config(cls, None, values)


def _logged(metrics: dict, key: str) -> list[float]:
    return [r[key] for r in metrics["log_history"] if key in r and "train_loss" not in r]


def _dense_side(model: Any, side: Any) -> torch.Tensor:
    """[T, V] log-probs of the completion tokens of one side, from an unbatched forward pass."""
    ids = torch.as_tensor(np.asarray(side.input_ids), dtype=torch.long).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    p = side.prompt_len
    return torch.log_softmax(logits[p - 1: len(side.input_ids) - 1], dim=-1)


def _first_batch(world: dict[str, Any], version: str, loader: Any, n: int) -> list[tuple[Any, Any]]:
    from train.preference_distill import pair_up

    v = DatasetStore(world["store"]).get(version)
    return pair_up(loader(v, "train"), v.ref)[:n]


def test_dckd_step_zero_matches_a_dense_computation(world: dict[str, Any], tmp_path: Path, tok: Any) -> None:
    """The student is the teacher (LoRA starts as a no-op), so both KL terms are ~0 at step 0 and the loss is the
    dense NLL of the chosen tokens: this catches any off-by-one between cache rows and student positions."""
    from train.dckd import cache_sides, run_dckd

    # one batch of every training pair: the step-0 loss does not depend on the sampler's order
    result = run_dckd(_cfg(DCKDConfig, world, tmp_path / "run", max_steps=1, batch_size=8), tokenizer=tok)
    first = result.metrics["log_history"][0]
    assert first["kl_chosen"] < 2e-3 and first["kl_rejected"] < 2e-3, first  # fp16 cache rounding only
    model = load_causal_lm(ModelRef.parse(str(world["teacher"])), dtype="float32", device="cpu").eval()
    pairs = _first_batch(world, "teacher-logits", cache_sides, 8)
    assert len(pairs) == 8
    nll = torch.cat([-_dense_side(model, c).gather(-1, torch.as_tensor(c.input_ids[c.prompt_len:]).unsqueeze(-1))
                     for c, _ in pairs])
    assert first["nll"] == pytest.approx(float(nll.mean()), rel=1e-4)
    assert first["loss"] == pytest.approx(first["nll"] + 0.1 * first["kl_chosen"] + 0.1 * first["kl_rejected"],
                                          rel=1e-4)
    run = json.loads((result.run.path / "run.json").read_text())
    assert run["config"]["alpha"] == 0.1 and run["config"]["beta"] == 0.1


def _coarse_kl(student_lp: torch.Tensor, side: Any) -> torch.Tensor:
    """Per token KL over the teacher's k ids + one bucket for the rest, both sides renormalised (dense student)."""
    ids = torch.as_tensor(side.top_ids)
    t = torch.as_tensor(side.teacher_logprobs, dtype=torch.float64)
    s = student_lp.double().gather(-1, ids)
    t_all = torch.cat([t, torch.as_tensor(side.residual, dtype=torch.float64).log().unsqueeze(-1)], -1)
    s_all = torch.cat([s, torch.log1p(-s.exp().sum(-1)).unsqueeze(-1)], -1)
    p, q = torch.log_softmax(t_all, -1), torch.log_softmax(s_all, -1)
    return (p.exp() * (p - q)).sum(-1)


def test_dckd_weights_and_kl_terms_match_a_dense_computation(world: dict[str, Any], tmp_path: Path,
                                                            tok: Any) -> None:
    """A student that is not the teacher, alpha != beta: each KL term is the pooled token mean of the coarse KL
    on its own side, weighted by its own weight (a swapped side or weight fails)."""
    from train.dckd import cache_sides, run_dckd

    result = run_dckd(_cfg(DCKDConfig, world, tmp_path / "run", model=str(world["reference"]), max_steps=1,
                           batch_size=8, alpha=0.3, beta=0.7), tokenizer=tok)
    first = result.metrics["log_history"][0]
    student = load_causal_lm(ModelRef.parse(str(world["reference"])), dtype="float32", device="cpu").eval()
    pairs = _first_batch(world, "teacher-logits", cache_sides, 8)
    kl = {name: float(torch.cat([_coarse_kl(_dense_side(student, p[i]), p[i]) for p in pairs]).mean())
          for i, name in enumerate(("kl_chosen", "kl_rejected"))}
    assert abs(kl["kl_chosen"] - kl["kl_rejected"]) > 0.05  # the sides differ, so a swap would show
    assert first["kl_chosen"] == pytest.approx(kl["kl_chosen"], rel=1e-4)
    assert first["kl_rejected"] == pytest.approx(kl["kl_rejected"], rel=1e-4)
    assert first["loss"] == pytest.approx(first["nll"] + 0.3 * kl["kl_chosen"] + 0.7 * kl["kl_rejected"], rel=1e-4)


@pytest.mark.parametrize("clamp", ["none", "reference"])
def test_adpa_step_zero_matches_a_dense_computation(world: dict[str, Any], tmp_path: Path, tok: Any,
                                                     clamp: str) -> None:
    from train.adpa import advantage_sides, run_adpa

    result = run_adpa(_cfg(ADPAConfig, world, tmp_path / "run", max_steps=1, batch_size=8, advantage_clamp=clamp),
                      tokenizer=tok)
    first = result.metrics["log_history"][0]
    model = load_causal_lm(ModelRef.parse(str(world["teacher"])), dtype="float32", device="cpu").eval()
    pairs = _first_batch(world, "advantage", advantage_sides, 8)
    assert len(pairs) == 8
    nll, adv = [], []
    for c, r in pairs:
        nll.append(-_dense_side(model, c).gather(-1, torch.as_tensor(c.input_ids[c.prompt_len:]).unsqueeze(-1)))
        q = _dense_side(model, r).exp().gather(-1, torch.as_tensor(r.top_ids))
        a = torch.as_tensor(r.advantage)
        if clamp == "reference":
            q, a = q.clamp(1e-8, 1 - 1e-8), a.clamp(1e-8, 1 - 1e-8)
        valid = torch.as_tensor(r.valid) if r.valid is not None else torch.ones_like(a, dtype=torch.bool)
        adv.append((q * a * valid).sum(-1))
    expected_adv = float(torch.cat(adv).mean())
    assert abs(expected_adv) > 1e-3  # a real signal, so the comparison means something
    assert first["adv"] == pytest.approx(expected_adv, rel=1e-4, abs=1e-6)
    assert first["nll"] == pytest.approx(float(torch.cat(nll).mean()), rel=1e-4)
    assert first["loss"] == pytest.approx(first["nll"] - 1.6 * first["adv"], rel=1e-4)


def test_adpa_plus_starts_from_the_dckd_student(world: dict[str, Any], tmp_path: Path, tok: Any) -> None:
    from train.adpa import run_adpa
    from train.dckd import run_dckd

    dckd = run_dckd(_cfg(DCKDConfig, world, tmp_path / "dckd", max_steps=3, save_merged=True), tokenizer=tok)
    plus = run_adpa(_cfg(ADPAConfig, world, tmp_path / "plus", init=str(dckd.run.path), evaluate=True),
                    tokenizer=tok)
    run = json.loads((plus.run.path / "run.json").read_text())
    assert run["init"] == str(dckd.run.path)
    assert str(dckd.run.path) in run["model_location"]
    pe = plus.metrics["preference_eval"]
    assert pe["n"] > 0 and 0.0 <= pe["accuracy_sum"] <= 1.0
    assert (plus.run.path / "preference_eval" / "margins.png").is_file()
    assert {"accuracy", "f1"} <= set(plus.metrics["eval"]["verbalizer"])  # DFAR metrics through the lineage


def test_dckd_says_it_does_not_use_tail_draws(world: dict[str, Any], tok: Any) -> None:
    """A sides cache with --tail-samples trains DCKD on kept ids + bucket, and the run says so in its notes."""
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from train.dckd import prepare_dckd

    store = DatasetStore(world["store"])
    cache_teacher_logits(store, LogitCacheConfig(model=str(world["teacher"]), dataset="preferences", config="sides",
                                                 k=16, max_length=64, dtype="float32", tail_samples=2,
                                                 name="tail-logits"), progress=False)
    cfg = load_config(DCKDConfig, None, {**QUICK, "cache": "tail-logits", "model": str(world["teacher"]),
                                         "store": str(world["store"])})
    assert any("tail draws" in n and "not used" in n for n in prepare_dckd(cfg, tok).notes)
    plain = load_config(DCKDConfig, None, {**QUICK, "cache": "teacher-logits", "model": str(world["teacher"]),
                                           "store": str(world["store"])})
    assert not any("tail draws" in n for n in prepare_dckd(plain, tok).notes)


def test_refusals_are_one_line_before_any_step(world: dict[str, Any], tmp_path: Path, tok: Any) -> None:
    from builders.teacher_logits import LogitCacheConfig, cache_teacher_logits
    from train.adpa import run_adpa
    from train.dckd import run_dckd

    store = DatasetStore(world["store"])
    cache_teacher_logits(store, LogitCacheConfig(model=str(world["teacher"]), dataset="dfar", config="lr", k=8,
                                                 max_length=64, name="dfar-cache"), progress=False)
    with pytest.raises(CurateError, match=r"lacks column\(s\) completion .*cached from the `sides` config"):
        cache_teacher_logits(store, LogitCacheConfig(model=str(world["teacher"]), dataset="preferences",
                                                     config="pairs", k=8), progress=False)
    with pytest.raises(CurateError, match="no side column"):
        run_dckd(_cfg(DCKDConfig, world, tmp_path / "a", cache="dfar-cache"), tokenizer=tok)
    with pytest.raises(CurateError, match="is not an advantage table"):
        run_adpa(_cfg(ADPAConfig, world, tmp_path / "b", advantage="teacher-logits"), tokenizer=tok)
    other = save_tiny(tmp_path / "other", tok, hidden=32)
    otok = __import__("copy").deepcopy(tok)
    otok.add_tokens(["<extra-token>"])
    otok.save_pretrained(other)
    with pytest.raises(CurateError, match="tokenizer fingerprint"):
        run_adpa(_cfg(ADPAConfig, world, tmp_path / "c", model=str(other)))
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_on_policy_rejected_rows_are_scored_like_the_caches(world: dict[str, Any], tok: Any) -> None:
    """The new rejected rows keep their prompts, hold the student's sample, and carry the teacher's top-k
    log-probs (DCKD) or teacher - reference at those ids (ADPA) of a dense forward of the new sequence."""
    from train.adpa import advantage_sides
    from train.losses import get_preference_loss
    from train.on_policy import OnPolicyRejected
    from train.preference_distill import PairCollator, pair_features

    pairs = _first_batch(world, "advantage", advantage_sides, 3)
    batch = PairCollator(tok.pad_token_id)(pair_features(pairs, 64, []))
    student = load_causal_lm(ModelRef.parse(str(world["reference"])), dtype="float32", device="cpu")
    teacher = load_causal_lm(ModelRef.parse(str(world["teacher"])), dtype="float32", device="cpu").eval()
    cfg = _cfg(ADPAConfig, world, Path("/unused"), on_policy=True, teacher_model=str(world["teacher"]),
               reference_model=str(world["reference"]), top_k=5, sample_max_new_tokens=5)
    hook = OnPolicyRejected.from_config(cfg, tok, get_preference_loss("adpa"))
    torch.manual_seed(0)
    out = hook(student, batch)
    b = len(pairs)
    assert torch.equal(out["input_ids"][:b, : batch["input_ids"].shape[1]][batch["attention_mask"][:b] == 1],
                       batch["input_ids"][:b][batch["attention_mask"][:b] == 1])  # chosen rows untouched
    for i, (_, r) in enumerate(pairs):
        n = int(out["attention_mask"][b + i].sum())
        p = int(out["answer_pos"][b + i]) + 1
        assert p == r.prompt_len and out["input_ids"][b + i, :p].tolist() == list(r.input_ids[:p])
        assert 1 <= n - p <= 5
        ids = out["input_ids"][b + i, :n].unsqueeze(0)
        with torch.no_grad():
            t_lp = torch.log_softmax(teacher(input_ids=ids).logits[0, p - 1: n - 1].float(), -1)
            r_lp = torch.log_softmax(hook.reference(input_ids=ids).logits[0, p - 1: n - 1].float(), -1)
        top_lp, top_ids = t_lp.topk(5, dim=-1)
        assert torch.equal(out["top_ids"][b + i, : n - p], top_ids)
        assert torch.allclose(out["advantage"][b + i, : n - p], top_lp - r_lp.gather(-1, top_ids), atol=1e-5)


def test_on_policy_runs_for_both_methods(world: dict[str, Any], tmp_path: Path, tok: Any) -> None:
    from train.adpa import run_adpa
    from train.dckd import run_dckd

    for cls, run in ((DCKDConfig, run_dckd), (ADPAConfig, run_adpa)):
        result = run(_cfg(cls, world, tmp_path / cls.__name__, on_policy=True, teacher_model=str(world["teacher"]),
                          reference_model=str(world["reference"]), top_k=8, sample_max_new_tokens=4), tokenizer=tok)
        assert len(_logged(result.metrics, "loss")) == 2
    with pytest.raises(CurateError, match="--reference-model"):
        run_adpa(_cfg(ADPAConfig, world, tmp_path / "x", on_policy=True, teacher_model=str(world["teacher"])),
                 tokenizer=tok)


def test_cli_help_and_a_run(world: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from curate.cli import app

    res = CliRunner().invoke(app, ["train", "adpa", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--advantage-clamp" in res.stdout and "[default: 1.6]" in res.stdout
    res = CliRunner().invoke(app, ["train", "dckd", "--store", str(world["store"]), "--cache", "teacher-logits",
                                   "--model", str(world["teacher"]), "--max-steps", "1", "--batch-size", "2",
                                   "--no-eval", "--run-dir", str(tmp_path / "cli"), "--max-length", "64"])
    assert res.exit_code == 0, res.output
    assert "run finished" in res.stdout
    res = CliRunner().invoke(app, ["train", "dckd", "--store", str(world["store"]), "--cache", "nope",
                                   "--run-dir", str(tmp_path / "cli2")])
    assert res.exit_code == 1 and "Traceback" not in res.output


def test_missing_eval_split_is_a_note_not_a_failure(world: dict[str, Any], tmp_path: Path, tok: Any) -> None:
    from train.dckd import run_dckd

    result = run_dckd(_cfg(DCKDConfig, world, tmp_path / "run", max_steps=1, evaluate=True, eval_split="heldout"),
                      tokenizer=tok)
    assert "preference_eval" not in result.metrics
    assert any("no preference evaluation" in n and "'heldout'" in n for n in result.metrics["notes"])
    assert (result.run.path / "metrics.json").is_file()


def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(world: dict[str, Any], tmp_path: Path,
                                                                 tok: Any) -> None:
    """--overwrite empties the run folder only once every check has passed: a typo loses nothing; a new run
    refused the same way leaves no empty folder behind."""
    from train.adpa import run_adpa

    new = tmp_path / "new-run"
    with pytest.raises(CurateError, match="is not an advantage table"):
        run_adpa(_cfg(ADPAConfig, world, new, advantage="teacher-logits"), tokenizer=tok)
    assert not new.exists()

    old = tmp_path / "run"
    old.mkdir()
    (old / "run.json").write_text("{}")
    with pytest.raises(CurateError, match="is not an advantage table"):  # refused inside prepare, after the folder
        run_adpa(_cfg(ADPAConfig, world, old, advantage="teacher-logits", overwrite=True), tokenizer=tok)
    assert (old / "run.json").read_text() == "{}"
    result = run_adpa(_cfg(ADPAConfig, world, old, max_steps=1, overwrite=True), tokenizer=tok)
    assert json.loads((result.run.path / "run.json").read_text())["config"]["method"] == "adpa"
