"""Run configs: one validation path for YAML and flags (through the CLI), replay of config.yaml files written
before the configs were typed, options generated from the fields, and the one quantisation decision."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from curate.cli import app
from curate.errors import CurateError
from curate.models import decide_quantization
from train.config import KDConfig, SFTConfig, dump_config, load_config

DATA = Path(__file__).parent / "data"
# identity() of the two files below, computed by the code that wrote them (it names default run folders)
V1_IDENTITY = {"sft": "6141dcaf", "kd": "1f03aff5"}
V1_DEFAULT_IDENTITY = {"sft": "8f31529d", "kd": "36e4ca1e"}


def _refused(args: list[str], *needles: str) -> str:
    """Exit 1 with one line (no traceback) containing every needle."""
    out = CliRunner().invoke(app, args)
    text = out.output.strip()
    assert out.exit_code == 1, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


@pytest.mark.parametrize(("line", "needle"), [
    ('limit: "abc"', "limit must be a number (whole) or null, not 'abc'"),
    ("eval_steps: [1]", "eval_steps must be a number (whole) or null, not [1]"),
    ("lora_target_modules: 5", "lora_target_modules must be a list or text, not 5"),
    ('student_layers: "two"', "student_layers must be a number (whole) or null, not 'two'"),
    ("use_lora: yes please", "use_lora must be true or false"),
    ("learning_rate: -0.001", "learning_rate must be > 0, got -0.001"),
    ("lora_dropout: 1", "lora_dropout must be in [0, 1), got 1"),
    ("template: html", "template must be one of plain, chat, not 'html'"),
    ("lora_rank: 4", "unknown SFTConfig option(s) in"),
])
def test_bad_yaml_value_is_one_line_naming_key_and_file(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"dataset_config: lr\n{line}\n")
    _refused(["train", "sft", "--config", str(path), "--store", str(tmp_path / "store")], needle, str(path))


@pytest.mark.parametrize(("args", "needle"), [
    (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5 (command line)"),
    (["--temperature", "0"], "temperature must be > 0, got 0.0 (command line)"),
    (["--lr", "-1e-4"], "learning_rate must be > 0, got -0.0001 (command line)"),
    (["--limit", "abc"], "limit must be a number (whole) or null, not 'abc' (command line)"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0 (command line)"),
    (["--kd-target", "logits"], "kd_target must be one of tokens, labels, not 'logits' (command line)"),
    (["--loss", "adpa"], "loss must be one of forward_kl, reverse_kl, jsd, not 'adpa' (command line)"),
    (["--set", "eval_steps=[1]"], "eval_steps must be a number (whole) or null, not [1] (command line)"),
    (["--resume", "--overwrite"], "choose one of --resume and --overwrite (command line)"),
])
def test_bad_flag_is_refused_by_the_same_rules(tmp_path: Path, args: list[str], needle: str) -> None:
    _refused(["train", "kd", "--store", str(tmp_path / "store"), *args], needle)


def test_flags_override_yaml_and_both_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "kd.yaml"
    path.write_text("alpha: 0.2\ntemperature: 3\n")
    _refused(["train", "kd", "--config", str(path), "--store", str(tmp_path / "s"), "--temperature", "-1"],
             "temperature must be > 0, got -1.0 (command line)")
    path.write_text("alpha: 2\n")
    _refused(["train", "kd", "--config", str(path), "--store", str(tmp_path / "s")],
             f"alpha must be in [0, 1], got 2 ({path})")
    cfg = load_config(KDConfig, DATA / "config_v1_kd.yaml", {"temperature": 3})
    assert cfg.temperature == 3.0 and isinstance(cfg.temperature, float) and cfg.alpha == 0.25


def test_cache_and_eval_options_use_the_same_rules(tmp_path: Path) -> None:
    store = ["--store", str(tmp_path / "store")]
    _refused(["cache-logits", *store, "--k", "0"], "k must be >= 1, got 0 (command line)")
    _refused(["cache-logits", *store, "--dtype", "f8"], "dtype must be one of auto, float32, bfloat16, float16")
    _refused(["cache-logits", *store, "--label-words", "ethical,,x"], "--label-words wants comma-separated words")
    _refused(["eval", *store, "--dtype", "half"], "dtype must be one of auto, float32, bfloat16, float16")


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_config_yaml_written_before_typed_configs_replays_unchanged(method: str) -> None:
    """tests/data/config_v1_*.yaml were written by `dump_config` before the configs were typed: every value
    comes back the same, the run's identity (its default folder name) is unchanged, and re-dumping keeps
    every key and value."""
    cls = SFTConfig if method == "sft" else KDConfig
    path = DATA / f"config_v1_{method}.yaml"
    written = yaml.safe_load(path.read_text())
    cfg = load_config(cls, path)
    now = cfg.to_dict()
    assert {k: now[k] for k in written} == written
    assert set(now) - set(written) == {"revision", "allow_changes", "subsets"}  # new keys, at their defaults
    assert cfg.identity() == V1_IDENTITY[method]
    assert cls().identity() == V1_DEFAULT_IDENTITY[method]
    again = yaml.safe_load(dump_config(cfg))
    assert {k: again[k] for k in written} == written and list(again)[0] == "method"
    assert load_config(cls, None, again) == cfg


def test_help_shows_each_default_once_declared(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["train", "lr", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    assert "[default: 0.0002]" in text and "[default: smollm2]" in text and "--dataset-config" not in text
    for flag in ("--lr", "--lora", "--full", "--no-eval", "--save-merged", "--load-in-8bit", "--allow-changes"):
        assert flag in text, flag
    cache = " ".join(CliRunner().invoke(app, ["cache-logits", "--help"], env={"COLUMNS": "250"}).output.split())
    assert "--teacher" in cache and "[default: u8-delta]" in cache and "--revision" in cache
    assert "[default: (' ')]" in cache  # --label-prefix: a single space, shown quoted rather than as blank
    for cmd in (["train", "sft"], ["train", "lr"], ["train", "kd"], ["cache-logits"], ["eval"]):
        assert "seeds" not in CliRunner().invoke(app, [*cmd, "--help"]).output, cmd  # no in-house jargon


def test_one_quantisation_rule_strict_for_the_cache_lenient_for_training(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(CurateError, match="^--load-in-8bit needs a CUDA GPU"):
        decide_quantization(True, False, strict=True, cuda_available=False)
    with caplog.at_level(logging.WARNING, logger="curate.models"):
        d = decide_quantization(False, True, strict=False, cuda_available=False)
    assert d.mode == "none" and "fell back to full precision" in d.reason
    assert any("--load-in-4bit needs a CUDA GPU" in r.getMessage() for r in caplog.records)
    assert decide_quantization(True, False, strict=True, cuda_available=True, bnb_available=True).mode == "8bit"
    with pytest.raises(CurateError, match="needs bitsandbytes"):
        decide_quantization(False, True, strict=True, cuda_available=True, bnb_available=False)


def test_set_pairs_are_read_like_flags() -> None:
    from curate.commands.train import _overrides

    got = _overrides(SFTConfig, {"seed": 3}, ["lora_target_modules=q_proj,v_proj", "limit=8", "lora-r=4",
                                              "eval_steps=null"], Path("/tmp/s"))
    assert got == {"seed": 3, "store": "/tmp/s", "lora_target_modules": ["q_proj", "v_proj"], "limit": 8,
                   "lora_r": 4, "eval_steps": None}


@pytest.mark.parametrize(("name", "cls"), [("sft_l", SFTConfig), ("lr", SFTConfig), ("kd", KDConfig)])
def test_example_configs_load(name: str, cls: type) -> None:
    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    cfg = load_config(cls, path)
    for key, value in yaml.safe_load(path.read_text()).items():
        assert getattr(cfg, key) == value, key
    assert "seeds" not in path.read_text()
