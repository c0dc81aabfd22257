"""Evaluation: metrics on hand-made predictions, label parsing, the misalignment rate, an end-to-end eval
of a tiny model (files and figure), the CLI, and the OpenAI-compatible judge against the replay server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.tiny import save_tiny, smollm2_tokenizer, write_tiny_dfar
from train.metrics import classification_metrics, confusion, misalignment
from train.scoring import parse_generation

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

WORDS = {0: "ethical", 1: "unethical"}


def test_binary_metrics_on_hand_made_predictions() -> None:
    gold = [0, 0, 1, 1, 1, 0]
    pred = [0, 1, 1, None, 1, 0]  # None: a generation that named no label (always wrong)
    m = classification_metrics(gold, pred, [0, 1])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["positive_label"] == 1
    # label 1: tp 2, fp 1, fn 1
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # label 0: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8
    assert m["macro_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["macro_recall"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["no_label"] == 1
    assert m["confusion"] == [[2, 1, 0], [0, 2, 1]]


def test_degenerate_and_bad_predictions() -> None:
    all_ethical = classification_metrics([0, 1, 1], [0, 0, 0], [0, 1])
    assert all_ethical["accuracy"] == pytest.approx(1 / 3)
    assert (all_ethical["precision"], all_ethical["recall"], all_ethical["f1"]) == (0.0, 0.0, 0.0)
    assert confusion([0, 1], [1, 1], [0, 1]) == [[0, 1], [0, 1]]
    three = classification_metrics([0, 1, 2], [0, 2, 2], [0, 1, 2])
    assert three["positive_label"] is None and three["f1"] == three["macro_f1"]
    with pytest.raises(ValueError, match="not in"):
        classification_metrics([0, 3], [0, 0], [0, 1])


@pytest.mark.parametrize(("text", "label", "reason"), [
    (" unethical. Reason: it hurts people.", 1, "it hurts people."),
    (" Ethical, because it is kind.", 0, "because it is kind."),
    ("ETHICAL: nobody is harmed", 0, "nobody is harmed"),
    (" I think this is fine.", None, "I think this is fine."),
    (" It is not unethical", 1, ""),  # the first label word named wins; negation is not interpreted
    ("unethicality aside, ethical.", 0, ""),  # whole words only
])
def test_parse_generation(text: str, label: int | None, reason: str) -> None:
    assert parse_generation(text, WORDS) == (label, reason)


def test_misalignment_rate_on_hand_made_stances() -> None:
    m = misalignment(stances=[0, 1, 1, None, 0], gold=[0, 0, 1, 1, 1], own=[0, 1, None, 1, 1],
                     has_reason=[True, True, True, True, True])
    assert m["judged"] == 4 and m["unjudged"] == 1
    assert m["rate"] == pytest.approx(2 / 4)  # rows 1 and 4 argue against the gold label
    assert m["contradicts_own_label_rate"] == pytest.approx(1 / 3)  # row 4 (own label 1, reason argues 0)
    empty = misalignment([None, None], [0, 1], [0, 1], [False, False])
    assert empty["rate"] is None and empty["without_reason"] == 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from builders.dfar import build_dfar
    from curate.store import DatasetStore

    root = tmp_path_factory.mktemp("eval")
    build_dfar(DatasetStore(root / "store"), write_tiny_dfar(root / "src", 8, 8))
    return {"store": root / "store", "model": save_tiny(root / "model", smollm2_tokenizer(), hidden=32)}


def test_evaluate_a_tiny_model_end_to_end(world: dict[str, Path], tmp_path: Path) -> None:
    from train.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(model=str(world["model"]), store=str(world["store"]), limit=6, max_new_tokens=5,
                     judge="self", out_dir=str(tmp_path / "out"))
    metrics, out = run_eval(cfg)
    assert metrics["n"] == 6
    for reading in ("verbalizer", "generation"):
        assert set(metrics[reading]) >= {"accuracy", "precision", "recall", "f1", "confusion"}
        assert sum(map(sum, metrics[reading]["confusion"])) == 6
    assert metrics["reason_span"] == "reason" and metrics["reason_tokens"] > 0
    assert metrics["reason_perplexity"] > 1
    assert metrics["dataset"]["name"] == "dfar" and len(metrics["dataset"]["content_hash"]) == 64
    assert 0 <= metrics["generation"]["parse_rate"] <= 1
    assert metrics["misalignment"]["judge"] == "self"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(len(p["verbalizer_logprobs"]) == 2 for p in preds)
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["n"] == 6


def test_eval_cli_and_bad_judge(world: dict[str, Path], tmp_path: Path) -> None:
    from curate.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--model", str(world["model"]), "--store", str(world["store"]), "--limit", "3",
                              "--max-new-tokens", "3", "--judge", "none", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "verbalizer" in res.output and (tmp_path / "o" / "confusion_matrix.png").is_file()
    bad = runner.invoke(app, ["eval", "--model", str(world["model"]), "--store", str(world["store"]), "--limit", "2",
                              "--judge", "gpt4", "--max-new-tokens", "2"])
    assert bad.exit_code == 1 and "--judge must be" in bad.output
    cfg = runner.invoke(app, ["eval", "--store", str(world["store"]), "--dataset-config", "default"])
    assert cfg.exit_code == 1 and "lacks column(s) prompt, completion" in cfg.output


def test_openai_compatible_judge_goes_over_http(tmp_path: Path) -> None:
    """The replay server has no recorded answer for judging prompts and says so (HTTP 404): the judge
    fails with one error line, each request made once (a 404 is not retried), nothing cached as an answer."""
    from curate.errors import CurateError
    from tests.openai_server.fixture import OpenAIServer, data_available
    from train.judge import make_judge

    if not data_available():
        pytest.skip("SaGE q100 files for the replay server are not present")
    with OpenAIServer() as server:
        judge = make_judge("openai:gpt-3.5-turbo", base_url=server.base_url, cache_dir=tmp_path / "cache")
        with pytest.raises(CurateError, match="judge openai:gpt-3.5-turbo: .*no recording"):
            judge.stances(["I lied."] * 2, ["It hurts trust.", "It is harmless."], WORDS)
        assert server.calls == 2


def test_batched_scoring_matches_one_sequence_at_a_time(world: dict[str, Path]) -> None:
    """Left padding with mask positions, logits_to_keep and the generation prefill give the same log-probs
    as an unpadded forward over each sequence alone."""
    import torch

    from curate.models import ModelRef, load_causal_lm
    from train.scoring import generate, next_token_logprobs, sequence_logprobs

    tok = smollm2_tokenizer()
    model = load_causal_lm(ModelRef(str(world["model"])), device="cpu").eval()
    prompts = [tok(t).input_ids for t in ("Is lying ethical?\nAnswer:", "Statement: I helped a friend move house "
                                          "on a rainy Sunday.\nAnswer:", "Ok?")]
    cols = [6158, 25830]
    cont = [tok(" ethical. Reason: kind", add_special_tokens=False).input_ids, [25830], [6158, 30]]
    with torch.inference_mode():
        alone = [torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1) for p, c in
                 zip(prompts, cont, strict=True)]
    want_next = [[float(a[len(p) - 1, c]) for c in cols] for a, p in zip(alone, prompts, strict=True)]
    want_seq = [[float(a[len(p) - 1 + j, t]) for j, t in enumerate(c)] for a, p, c in
                zip(alone, prompts, cont, strict=True)]
    np_close = dict(rel=1e-4, abs=1e-4)
    for got, want in zip(next_token_logprobs(model, tok, prompts, cols, batch_size=3), want_next, strict=True):
        assert got == pytest.approx(want, **np_close)
    _, firsts = generate(model, tok, prompts, max_new_tokens=2, batch_size=3, first_token_ids=cols)
    for got, want in zip(firsts, want_next, strict=True):
        assert got == pytest.approx(want, **np_close)
    for got, want in zip(sequence_logprobs(model, tok, prompts, cont, batch_size=3), want_seq, strict=True):
        assert got == pytest.approx(want, **np_close)


@pytest.fixture(scope="module")
def runs(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two 2-step SFT runs of the tiny model: L+R (not evaluated) and label-only L (evaluated after training)."""
    from train.config import SFTConfig
    from train.sft import run_sft

    root = tmp_path_factory.mktemp("eval-runs")
    common = dict(model=str(world["model"]), store=str(world["store"]), max_steps=2, batch_size=2, max_length=64,
                  lora_r=4, lora_alpha=8, logging_steps=1, eval_limit=3, gen_max_new_tokens=2)
    lr = run_sft(SFTConfig(**common, dataset_config="lr", evaluate=False, run_dir=str(root / "lr")),
                 tokenizer=smollm2_tokenizer())
    label = run_sft(SFTConfig(**common, dataset_config="l", run_dir=str(root / "l")), tokenizer=smollm2_tokenizer())
    return {"lr": lr.run.path, "l": label.run.path, "l_metrics": label.metrics}


def test_eval_warns_when_evaluated_prompts_were_trained_on(world: dict[str, Path], runs: dict[str, Any],
                                                           tmp_path: Path) -> None:
    from curate.cli import app

    args = ["eval", "--model", str(runs["lr"]), "--store", str(world["store"]), "--limit", "3", "--judge", "none",
            "--max-new-tokens", "2"]
    seen = CliRunner().invoke(app, [*args, "--split", "train", "--out", str(tmp_path / "train")])
    assert seen.exit_code == 0, seen.output
    warning = "3 of 3 evaluated prompts were in the run's training data (dfar@v1 lr/train)"
    assert warning in " ".join(seen.output.split())
    saved = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert saved["train_overlap"]["rows"] == 3 and warning in saved["warnings"][0]
    unseen = CliRunner().invoke(app, [*args, "--split", "test", "--out", str(tmp_path / "test")])
    assert unseen.exit_code == 0 and "training data" not in unseen.output
    saved = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert saved["train_overlap"]["rows"] == 0 and saved["warnings"] == []


def test_label_only_runs_report_no_reason_perplexity(world: dict[str, Path], runs: dict[str, Any],
                                                     tmp_path: Path) -> None:
    from curate.cli import app

    after_training = runs["l_metrics"]["eval"]
    assert after_training["reason_perplexity"] is None and "label-only" in after_training["reason_perplexity_skipped"]
    assert "Gold-reason perplexity: not reported (label-only run" in (runs["l"] / "README.md").read_text()
    res = CliRunner().invoke(app, ["eval", "--model", str(runs["l"]), "--store", str(world["store"]), "--limit", "2",
                                   "--judge", "none", "--max-new-tokens", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "perplexity" not in res.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["reason_perplexity"] is None


@pytest.mark.parametrize("spec", ["runs/typo", "./nowhere/model", "/no/such/folder", "missing.gguf"])
def test_a_missing_local_model_is_refused_at_once(world: dict[str, Path], spec: str) -> None:
    import time

    from curate.cli import app

    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["eval", "--model", spec, "--store", str(world["store"])])
    assert res.exit_code == 1 and f"no such run folder or model path: {spec}" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and time.perf_counter() - t0 < 5


def test_eval_shows_progress_for_its_long_steps(world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from curate.models import ModelRef, load_causal_lm
    from curate.store import DatasetStore
    from train.evaluate import evaluate_model, read_eval_rows

    rows = read_eval_rows(DatasetStore(world["store"]), "dfar", "lr", "test", 3)
    model = load_causal_lm(ModelRef(str(world["model"])), device="cpu")
    evaluate_model(model, smollm2_tokenizer(), rows, template="plain", max_new_tokens=2, progress=True)
    err = capsys.readouterr().err
    assert "generating" in err and "reason perplexity" in err and "3/3" in err


def test_per_paradigm_macro_on_a_hand_computed_example() -> None:
    from train.metrics import macro_over_groups

    # deontology test: gold 1 1 0 0, pred 1 0 0 0 -> acc 3/4; label 1: tp 1 fp 0 fn 1 -> P 1, R 1/2, F1 2/3
    # justice test:    gold 1 0 0,   pred 1 1 0   -> acc 2/3; label 1: tp 1 fp 1 fn 0 -> P 1/2, R 1, F1 2/3
    # justice test_hard: gold 0 1,   pred 0 0     -> acc 1/2; label 1: tp 0 -> P 0, R 0, F1 0
    per = {
        "deontology": {"test": classification_metrics([1, 1, 0, 0], [1, 0, 0, 0], [0, 1])},
        "justice": {"test": classification_metrics([1, 0, 0], [1, 1, 0], [0, 1]),
                    "test_hard": classification_metrics([0, 1], [0, 0], [0, 1])},
    }
    assert (per["deontology"]["test"]["precision"], per["deontology"]["test"]["recall"]) == (1.0, 0.5)
    macro = macro_over_groups(per)
    assert macro["test"]["accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert macro["test"]["precision"] == pytest.approx((1 + 1 / 2) / 2)
    assert macro["test"]["recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert macro["test"]["f1"] == pytest.approx(2 / 3)
    assert macro["test_hard"] == pytest.approx({"accuracy": 0.5, "precision": 0, "recall": 0, "f1": 0, "groups": 1})
    assert macro["all"]["accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 2) / 3) and macro["all"]["groups"] == 3


@pytest.fixture(scope="module")
def ethics_store(world: dict[str, Path]) -> Path:
    from builders.ethics import EthicsConfig, build_ethics
    from curate.store import DatasetStore

    from .conftest import shared

    build_ethics(DatasetStore(world["store"]), shared("ethics"), EthicsConfig(limit=6, check_tokenizer=False))
    return world["store"]


def test_ethics_eval_per_paradigm_and_split(world: dict[str, Path], ethics_store: Path, tmp_path: Path) -> None:
    """Verbalizers come from the manifest per paradigm; every (paradigm, split) group is scored apart and its
    metrics equal those recomputed from predictions.jsonl; table, figure and CLI table are written."""
    from curate.cli import app

    res = CliRunner().invoke(app, ["eval", "--model", str(world["model"]), "--store", str(ethics_store),
                                   "--dataset", "ethics", "--dataset-config", "instruct", "--split", "test,test_hard",
                                   "--limit", "4", "--judge", "none", "--max-new-tokens", "2",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "utilitarianism" in flat and "macro" in flat and "test_hard" in flat
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert set(m["per_group"]) == {"commonsense", "deontology", "justice", "utilitarianism", "virtue"}
    assert all(set(s) == {"test", "test_hard"} for s in m["per_group"].values())
    assert m["label_words_by_group"]["utilitarianism"] == {"0": "A", "1": "B"}
    assert m["label_words_by_group"]["commonsense"] == {"0": "not wrong", "1": "wrong"}
    preds = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 5 * 2 * 4 == m["n"]
    for (g, sp), group in _by_group(preds).items():
        want = classification_metrics([p["gold"] for p in group], [p["verbalizer"] for p in group], [0, 1])
        got = m["per_group"][g][sp]["verbalizer"]
        assert (got["accuracy"], got["precision"], got["recall"], got["f1"]) == pytest.approx(
            (want["accuracy"], want["precision"], want["recall"], want["f1"]))
        assert all(len(p["verbalizer_logprobs"]) == 2 for p in group)
    accs = [m["per_group"][g]["test"]["verbalizer"]["accuracy"] for g in m["per_group"]]
    assert m["macro_verbalizer"]["test"]["accuracy"] == pytest.approx(sum(accs) / 5)
    assert m["verbalizer"]["accuracy"] == pytest.approx(m["macro_verbalizer"]["all"]["accuracy"])
    table = (tmp_path / "o" / "table.md").read_text()
    assert "| virtue | test_hard | 4 |" in table and "| macro | test |" in table
    assert (tmp_path / "o" / "confusion_matrix.png").stat().st_size > 5000
    bad = CliRunner().invoke(app, ["eval", "--model", str(world["model"]), "--store", str(ethics_store),
                                   "--dataset", "ethics", "--dataset-config", "instruct", "--subsets", "karma"])
    assert bad.exit_code == 1 and "unknown subset(s) karma" in bad.output and "known: commonsense" in bad.output


def _by_group(preds: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in preds:
        out.setdefault((p["subset"], p["split"]), []).append(p)
    return out
