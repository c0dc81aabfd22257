"""SFT (L) and L+R training on a tiny random Llama with the real SmolLM2 tokenizer: masking, packing, loss
going down, resume continuing the same curve, the run folder, YAML configs and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from curate.errors import CurateError
from tests.tiny import save_tiny, write_tiny_dfar
from train.config import SFTConfig, load_config
from train.data import IGNORE, pack, tokenize_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

QUICK = dict(max_steps=20, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=10, max_length=64,
             eval_limit=6, gen_max_new_tokens=6, lora_r=8, lora_alpha=16, lora_dropout=0.0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", tok, hidden=32)


@pytest.fixture(scope="module")
def dfar_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builders.dfar import build_dfar
    from curate.store import DatasetStore

    root = tmp_path_factory.mktemp("sft-store")
    build_dfar(DatasetStore(root / "store"), write_tiny_dfar(root / "src", 48, 16))
    return root / "store"


def _cfg(tiny_dir: Path, store: Path, run_dir: Path, **kw) -> SFTConfig:
    values = {**QUICK, "model": str(tiny_dir), "store": str(store), "run_dir": str(run_dir), **kw}
    return load_config(SFTConfig, None, values)


def _losses(metrics: dict) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics["log_history"] if "loss" in r}


def test_prompt_is_masked_and_ids_match_the_cache_rule(tok) -> None:
    """labels ignore the prompt; ids are tok(prompt) + tok(completion) as the teacher-logit cache builds them."""
    prompts = ["Is it ethical?\nAnswer:", "Statement: I lied.\nAnswer:"]
    completions = [" ethical. Reason: kind.", " unethical"]
    rows = tokenize_rows(tok, prompts, completions, template="plain", max_length=64, append_eos=False)
    for ex, p, c in zip(rows.examples, prompts, completions, strict=True):
        p_ids = tok(p).input_ids
        assert ex["input_ids"] == p_ids + tok(c, add_special_tokens=False).input_ids
        assert ex["labels"][: len(p_ids)] == [IGNORE] * len(p_ids)
        assert ex["labels"][len(p_ids):] == ex["input_ids"][len(p_ids):]
    eos = tokenize_rows(tok, prompts, completions, template="plain", max_length=64, append_eos=True)
    assert all(ex["input_ids"][-1] == tok.eos_token_id for ex in eos.examples)
    cut = tokenize_rows(tok, prompts, completions, template="plain", max_length=len(tok(prompts[0]).input_ids) + 2,
                        append_eos=False)
    assert cut.truncated >= 1 and cut.notes
    with pytest.raises(CurateError, match="max_length"):
        tokenize_rows(tok, prompts[:1], completions[:1], template="plain", max_length=3, append_eos=False)


def test_packing_keeps_masks_and_respects_max_length(tok) -> None:
    rows = tokenize_rows(tok, ["a b c\nAnswer:"] * 5, [" ethical"] * 5, template="plain", max_length=64,
                         append_eos=True)
    n = len(rows.examples[0]["input_ids"])
    blocks = pack(rows.examples, 3 * n)
    assert [len(b["input_ids"]) for b in blocks] == [3 * n, 2 * n]
    assert blocks[0]["position_ids"] == list(range(n)) * 3
    assert sum(x != IGNORE for b in blocks for x in b["labels"]) == sum(
        x != IGNORE for e in rows.examples for x in e["labels"])


def test_packed_examples_do_not_attend_to_each_other(tok, tmp_path: Path) -> None:
    """Per-example completion losses of a packed batch equal the unpacked ones (and the SFT loss too);
    the old plain concatenation, where later examples attend to earlier ones, did not."""
    import torch
    from transformers import TrainingArguments

    from tests.tiny import tiny_llama
    from train.data import CompletionCollator
    from train.sft import SFTTrainer
    from train.token_rows import logprobs_at, supervised_positions

    model = tiny_llama(len(tok), hidden=32, seed=2, pad_token_id=tok.pad_token_id).eval()
    prompts = ["Statement: I lied to my boss.\nAnswer:", "Is it fine to steal?\nAnswer:",
               "Statement: I helped a stranger.\nAnswer:", "Ok?\nAnswer:"]
    completions = [" unethical. Reason: it breaks trust.", " unethical", " ethical. Reason: kind.", " ethical"]
    rows = tokenize_rows(tok, prompts, completions, template="plain", max_length=64, append_eos=True)
    collate = CompletionCollator(tok.pad_token_id)
    plain, packed = collate(rows.examples), collate(pack(rows.examples, 48))
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # two blocks, flattened

    def per_example(batch: dict, example_of: torch.Tensor) -> list[float]:
        rows_, pos, targets = supervised_positions(batch["labels"])
        with torch.no_grad():
            lp = logprobs_at(model, batch["input_ids"], batch.get("attention_mask"), rows_, pos,
                             batch.get("position_ids")).gather(-1, targets[:, None])[:, 0]
        owner = example_of[rows_, pos]
        return [float(-lp[owner == i].mean()) for i in range(len(prompts))]

    plain_owner = torch.arange(len(prompts))[:, None].expand_as(plain["input_ids"])
    packed_owner = (packed["position_ids"] == 0).cumsum(-1) - 1
    want = per_example(plain, plain_owner)
    assert per_example(packed, packed_owner) == pytest.approx(want, rel=1e-5, abs=1e-5)
    crosstalk = per_example({"input_ids": packed["input_ids"], "labels": packed["labels"],
                             "attention_mask": torch.ones_like(packed["input_ids"])}, packed_owner)
    assert max(abs(a - b) for a, b in zip(crosstalk, want, strict=True)) > 1e-2  # the old `pack` concatenation

    trainer = SFTTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                             report_to="none"))
    with torch.no_grad():
        assert float(trainer.compute_loss(model, packed)) == pytest.approx(float(trainer.compute_loss(model, plain)),
                                                                           rel=1e-5)


@pytest.fixture(scope="module")
def lr_run(tiny_dir: Path, dfar_store: Path, tmp_path_factory: pytest.TempPathFactory, tok):
    """One 20-step L+R run (checkpoints at 10 and 20, evaluated), shared by the checks below."""
    from train.sft import run_sft

    return run_sft(_cfg(tiny_dir, dfar_store, tmp_path_factory.mktemp("lr") / "run", dataset_config="lr",
                        judge="self"), tokenizer=tok)


def _decreasing(losses: list[float]) -> None:
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


def test_twenty_steps_of_label_only_sft_reduce_training_loss(tiny_dir: Path, dfar_store: Path, tmp_path: Path,
                                                             tok) -> None:
    from train.sft import run_sft

    result = run_sft(_cfg(tiny_dir, dfar_store, tmp_path / "run", dataset_config="l", evaluate=False),
                     tokenizer=tok)
    _decreasing(list(_losses(result.metrics).values()))
    assert (result.run.path / "adapter" / "adapter_model.safetensors").is_file()


def test_twenty_steps_of_lr_reduce_training_loss_and_fill_the_run_folder(lr_run) -> None:
    _decreasing(list(_losses(lr_run.metrics).values()))
    run = lr_run.run.path
    for rel in ("config.yaml", "datasets.json", "run.json", "metrics.json", "README.md", "plots/loss.png",
                "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "eval/metrics.json",
                "eval/confusion_matrix.png", "eval/predictions.jsonl"):
        assert (run / rel).is_file(), rel
    used = json.loads((run / "datasets.json").read_text())
    assert used[0]["name"] == "dfar" and len(used[0]["content_hash"]) == 64 and used[0]["config"] == "lr"
    assert yaml.safe_load((run / "config.yaml").read_text())["dataset_config"] == "lr"
    ev = lr_run.metrics["eval"]
    assert ev["n"] == 6 and 0.0 <= ev["verbalizer"]["accuracy"] <= 1.0 and ev["reason_perplexity"] > 1
    assert ev["reason_span"] == "reason" and ev["misalignment"]["judge"] == "self"
    card = (run / "README.md").read_text()
    assert "library_name: peft" in card and used[0]["content_hash"][:16] in card
    assert card.startswith("---\n") and "- dfar@v1\n" in card and "pipeline_tag: text-generation" in card


def test_parameter_counts_in_run_json(lr_run, tiny_dir: Path) -> None:
    """LoRA r=8 on every linear layer of the tiny model: r·(in + out) per projection, counted independently."""
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.from_pretrained(tiny_dir)
    h, m, r = c.hidden_size, c.intermediate_size, QUICK["lora_r"]
    lora = c.num_hidden_layers * (4 * r * (h + h) + 3 * r * (h + m))  # q k v o, gate up down
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    info = json.loads((lr_run.run.path / "run.json").read_text())
    assert (info["trainable_params"], info["total_params"]) == (lora, base + lora)


def _killed_while_saving(done: Path, dest: Path, how: str) -> Path:
    """The run folder as a kill during the step-20 checkpoint save leaves it: checkpoint-10 complete,
    checkpoint-20 empty (`empty`) or with weights but a truncated trainer_state.json (`truncated`)."""
    shutil.copytree(done, dest, ignore=shutil.ignore_patterns("adapter", "eval", "plots", "metrics.json",
                                                              "README.md"))
    last = dest / "checkpoints" / "checkpoint-20"
    if how == "empty":
        shutil.rmtree(last)
        last.mkdir()
    else:
        state = last / "trainer_state.json"
        state.write_text(state.read_text()[:200])
        (last / "optimizer.pt").unlink()
    return dest


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_only_complete_checkpoints_count(lr_run, tmp_path: Path, how: str) -> None:
    from train.run_folder import RunFolder, checkpoint_complete

    part = _killed_while_saving(lr_run.run.path, tmp_path / "part", how)
    assert checkpoint_complete(lr_run.run.path / "checkpoints" / "checkpoint-20")
    assert not checkpoint_complete(part / "checkpoints" / "checkpoint-20")
    assert RunFolder(part).latest_checkpoint() == part / "checkpoints" / "checkpoint-10"
    shutil.rmtree(part / "checkpoints" / "checkpoint-10")
    with pytest.raises(CurateError, match=r"no complete checkpoint to resume from \(checkpoint-20 incomplete"):
        RunFolder.prepare(SFTConfig(run_dir=str(part), resume=True), "x", is_main=True)


def test_resume_continues_the_same_loss_curve(lr_run, tiny_dir: Path, dfar_store: Path, tmp_path: Path,
                                              tok) -> None:
    """A kill during the step-20 save: --resume takes checkpoint-10, refuses changed options in one line,
    and with allow_changes records them as a new segment without rewriting config.yaml / datasets.json."""
    from train.sft import run_sft

    part = _killed_while_saving(lr_run.run.path, tmp_path / "part", "empty")
    config_before = (part / "config.yaml").read_bytes()
    datasets_before = (part / "datasets.json").read_bytes()
    same = dict(dataset_config="lr", judge="self", resume=True)
    with pytest.raises(CurateError, match=r"^--resume with options that differ .*: evaluate True -> False; .*"
                                          r"--allow-changes") as refused:
        run_sft(_cfg(tiny_dir, dfar_store, part, **same, evaluate=False), tokenizer=tok)
    assert "\n" not in str(refused.value) and "curate train sft --config" in str(refused.value)
    resumed = run_sft(_cfg(tiny_dir, dfar_store, part, **same, evaluate=False, allow_changes=True), tokenizer=tok)
    a, b = _losses(lr_run.metrics), _losses(resumed.metrics)
    assert sorted(b) == list(range(1, 21))  # history before the checkpoint comes back from trainer_state
    for step in range(11, 21):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4), step
    assert (part / "config.yaml").read_bytes() == config_before
    assert (part / "datasets.json").read_bytes() == datasets_before
    segments = json.loads((part / "run.json").read_text())["segments"]
    assert [s["start_step"] for s in segments] == [0, 10]
    assert segments[1]["changes"] == {"evaluate": [True, False]}
    assert segments[1]["resumed_from"] == "checkpoints/checkpoint-10"
    assert yaml.safe_load((part / segments[1]["config_file"]).read_text())["evaluate"] is False
    with pytest.raises(CurateError, match="already exists"):
        run_sft(_cfg(tiny_dir, dfar_store, part, dataset_config="lr"), tokenizer=tok)


def test_config_file_flags_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("dataset_config: lr\nlora_r: 4\nlearning_rate: 1\nlora_target_modules: [q_proj, v_proj]\n")
    cfg = load_config(SFTConfig, path, {"lora_r": 2})
    assert (cfg.dataset_config, cfg.lora_r, cfg.learning_rate) == ("lr", 2, 1.0)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(CurateError, match="unknown SFTConfig option"):
        load_config(SFTConfig, None, {"lora_rank": 4})
    with pytest.raises(CurateError, match="must be a number"):
        load_config(SFTConfig, None, {"lora_r": "big"})
    with pytest.raises(CurateError, match="method"):
        load_config(SFTConfig, None, {"method": "kd"})
    with pytest.raises(CurateError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "missing.yaml")


def test_cli_trains_lr_and_refuses_bad_input(tiny_dir: Path, dfar_store: Path, tmp_path: Path) -> None:
    from curate.cli import app

    runner = CliRunner()
    args = ["train", "lr", "--model", str(tiny_dir), "--store", str(dfar_store), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "48", "--limit", "8", "--no-eval", "--run-dir", str(tmp_path / "r"),
            "--set", "logging_steps=1", "--lora-target-modules", "q_proj,v_proj"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "run finished" in res.output
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["lora_target_modules"] == ["q_proj",
                                                                                                      "v_proj"]
    bad = runner.invoke(app, ["train", "sft", "--store", str(dfar_store), "--set", "nonsense=1"])
    assert bad.exit_code == 1 and "unknown SFTConfig option" in bad.output
    missing = runner.invoke(app, ["train", "sft", "--store", str(dfar_store), "--dataset", "nope"])
    assert missing.exit_code == 1 and "no dataset named 'nope'" in missing.output


def test_cli_resume_refuses_changed_options_in_one_line(tiny_dir: Path, dfar_store: Path, tmp_path: Path) -> None:
    from curate.cli import app

    runner = CliRunner()
    args = ["train", "lr", "--model", str(tiny_dir), "--store", str(dfar_store), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "48", "--limit", "8", "--no-eval", "--run-dir", str(tmp_path / "r"),
            "--set", "save_steps=1", "--lora-r", "4"]
    assert runner.invoke(app, args).exit_code == 0
    config = (tmp_path / "r" / "config.yaml").read_bytes()
    res = runner.invoke(app, [*args, "--resume", "--lr", "0.5", "--lora-r", "8"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert "lora_r 4 -> 8, learning_rate 0.0002 -> 0.5;" in lines[0] and "--allow-changes" in lines[0]
    assert (tmp_path / "r" / "config.yaml").read_bytes() == config
    allowed = runner.invoke(app, [*args, "--resume", "--lr", "0.5", "--max-steps", "3", "--allow-changes"])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "r" / "config.yaml").read_bytes() == config
    segments = json.loads((tmp_path / "r" / "run.json").read_text())["segments"]
    assert segments[1]["start_step"] == 2
    assert segments[1]["changes"] == {"max_steps": [2, 3], "learning_rate": [0.0002, 0.5]}
    assert yaml.safe_load((tmp_path / "r" / segments[1]["config_file"]).read_text())["max_steps"] == 3


def test_ctrl_c_names_the_exact_command_that_resumes(tiny_dir: Path, dfar_store: Path, tmp_path: Path) -> None:
    """A real SIGINT to a training process; the command it prints continues the run to its last step."""
    import os
    import shlex
    import signal
    import subprocess
    import sys

    from curate.cli import app

    run = tmp_path / "r"
    cmd = [str(Path(sys.executable).parent / "curate"), "train", "lr", "--model", str(tiny_dir), "--store",
           str(dfar_store), "--max-steps", "60", "--batch-size", "2", "--max-length", "48", "--limit", "8",
           "--no-eval", "--run-dir", str(run), "--set", "save_steps=3", "--set", "logging_steps=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step 7/"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "interrupted at step" in err and "Resume with: " in err, err
    resume = shlex.split(" ".join(err.split("Resume with: ", 1)[1].split()))
    assert resume[:3] == ["curate", "train", "sft"] and resume[-1] == "--resume"
    res = CliRunner().invoke(app, resume[1:])
    assert res.exit_code == 0, res.output
    segments = json.loads((run / "run.json").read_text())["segments"]
    assert len(segments) == 2 and segments[1]["start_step"] >= 6 and "changes" not in segments[1]
    assert json.loads((run / "metrics.json").read_text())["train"]["global_step"] == 60
