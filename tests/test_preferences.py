"""`curate build preferences`: pairs from real DFAR rows with a tiny random model, an OpenAI-compatible server and a
real SmolLM2 student; pairs from local files in the plain and chat-message layouts; each input error; the CLI.

Expected values are computed here independently: generations by calling `model.generate` directly, labels with
this file's own regex, splits and ids with hashlib, DFAR rows read with polars.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from builders.dfar import DfarConfig, build_dfar
from builders.preferences import DEFAULT_OPENAI_PROMPT, PreferencesConfig, build_preferences
from curate.cli import app
from curate.errors import CurateError
from curate.store import DatasetStore
from tests.conftest import shared
from tests.openai_server.faulty import FaultyServer

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

DATA = Path(__file__).parent / "data" / "preferences"
WORDS = {0: "ethical", 1: "unethical"}
LR = " {label_text}. Reason: {reason}"


@pytest.fixture(scope="module")
def dfar_store(tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    """Real DFAR rows, the first 3 of each split."""
    st = DatasetStore(tmp_path_factory.mktemp("pref-store"))
    build_dfar(st, shared("dfar"), DfarConfig(limit=3))
    return st


def _fresh(st: DatasetStore, tmp_path: Path) -> DatasetStore:
    """A copy of the shared DFAR store, so each test's preference versions start at v1."""
    shutil.copytree(st.root, tmp_path / "store")
    return DatasetStore(tmp_path / "store")


def _dfar_rows(st: DatasetStore) -> pl.DataFrame:
    """The DFAR lr rows joined with their statements, read with polars (the builder's input, independently)."""
    v = st.get("dfar")
    lr = pl.concat([pl.read_parquet(p) for p in v.files("lr")])
    default = pl.concat([pl.read_parquet(p) for p in v.files("default")]).select("id", "statement")
    return lr.join(default, on="id", how="left", maintain_order="left")


def _greedy(model: Any, tok: Any, ids: list[int], n: int) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def _check_sides(v: Any) -> None:
    """sides = pairs long, chosen row then rejected row, same id, split and prompt."""
    pairs = v.read("pairs").to_pylist()
    sides = v.read("sides").to_pylist()
    assert v.read("sides").column_names == ["id", "side", "prompt", "completion", "split"]
    assert len(sides) == 2 * len(pairs)
    for p, c, r in zip(pairs, sides[0::2], sides[1::2], strict=True):
        assert (c["id"], c["side"], c["prompt"], c["completion"], c["split"]) == (
            p["id"], "chosen", p["prompt"], p["chosen"], p["split"])
        assert (r["id"], r["side"], r["prompt"], r["completion"], r["split"]) == (
            p["id"], "rejected", p["prompt"], p["rejected"], p["split"])


def _no_weights(*_: Any, **__: Any) -> None:
    raise AssertionError("a rebuild whose answers are all logged must not load the weights")


def test_from_dfar_with_a_local_model(dfar_store: DatasetStore, tok: Any, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from curate.models import ModelRef, load_causal_lm
    from tests.tiny import save_tiny

    st = _fresh(dfar_store, tmp_path)
    folder = save_tiny(tmp_path / "tiny", tok)
    params = PreferencesConfig(from_dataset="dfar", rejected=f"model:{folder}", max_new_tokens=6, batch_size=1)
    result = build_preferences(st, params)
    v = result.version
    assert result.created and v.ref == "preferences@v1" and v.configs() == ["pairs", "sides"]
    assert v.read("pairs").column_names == ["id", "prompt", "chosen", "rejected", "split", "source", "label",
                                            "rejected_source"]
    assert v.manifest["parents"][0]["content_hash"] == st.get("dfar").hash

    model = load_causal_lm(ModelRef(str(folder)), device="cpu")
    want = {}
    for r in _dfar_rows(st).iter_rows(named=True):
        opposite = WORDS[1 - r["label"]]
        prefix = f" {opposite}. Reason:"
        ids = list(tok(r["prompt"]).input_ids) + list(tok(prefix, add_special_tokens=False).input_ids)
        text = _greedy(model, tok, ids, 6)
        reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        if reason:
            want[r["id"]] = (r["split"], r["prompt"], r["completion"], LR.format(label_text=opposite, reason=reason))
    got = {p["id"]: (p["split"], p["prompt"], p["chosen"], p["rejected"]) for p in v.read("pairs").to_pylist()}
    assert got == want and len(got) >= 4
    for p in v.read("pairs").to_pylist():
        assert p["rejected"].startswith(f" {WORDS[1 - p['label']]}. Reason:")
        assert p["chosen"].startswith(f" {WORDS[p['label']]}. Reason:")
        assert (p["source"], p["rejected_source"]) == ("dfar@v1", f"model:{folder}")
    assert v.splits("pairs") == ["train", "test"]
    _check_sides(v)
    counts = v.manifest["params"]["counts"]
    assert counts["read"] == 6 and counts["kept"] == len(want)

    logs = list((st.root / "work" / "preferences").glob("*/generations.jsonl"))
    assert len(logs) == 1 and len(logs[0].read_text().splitlines()) == 6
    logs[0].write_text("".join(logs[0].read_text().splitlines(keepends=True)[:2]))  # a run stopped after 2 rows
    again = build_preferences(st, params)  # same inputs: the same version; only the 4 missing rows generated
    assert not again.created and again.version.hash == v.hash and again.version.ref == "preferences@v1"
    assert len(logs[0].read_text().splitlines()) == 6
    monkeypatch.setattr("curate.models.load_causal_lm", _no_weights)
    third = build_preferences(st, params)  # nothing generated again, and the weights stay on disk
    assert len(logs[0].read_text().splitlines()) == 6 and third.version.hash == v.hash


@pytest.fixture(scope="module")
def echo_server() -> Iterator[FaultyServer]:
    """A real OpenAI-compatible HTTP server on loopback that answers "Answer: <last user message>"."""
    server = FaultyServer().start()
    yield server
    server.stop()


def test_from_dfar_with_an_openai_endpoint(dfar_store: DatasetStore, echo_server: FaultyServer,
                                           tmp_path: Path) -> None:
    st = _fresh(dfar_store, tmp_path)
    echo_server.reset()
    params = PreferencesConfig(from_dataset="dfar", rejected="openai:gpt-test", base_url=echo_server.base_url,
                               split="test")
    v = build_preferences(st, params).version
    rows = _dfar_rows(st).filter(pl.col("split") == "test")
    want = {}
    for r in rows.iter_rows(named=True):
        opposite = WORDS[1 - r["label"]]
        user = DEFAULT_OPENAI_PROMPT.format(statement=r["statement"], label_text=opposite)
        assert r["statement"] in user
        reason = " ".join(f"Answer: {user[-300:]}".split())
        want[r["id"]] = LR.format(label_text=opposite, reason=reason)
    assert {p["id"]: p["rejected"] for p in v.read("pairs").to_pylist()} == want
    assert v.splits("pairs") == ["test"] and echo_server.calls == 3
    assert all(s.body["temperature"] == 0.0 for s in echo_server.seen)
    gen = v.manifest["params"]["rejected_generation"]
    assert gen["model"] == "gpt-test" and gen["base_url"].startswith("http://127.0.0.1")
    _check_sides(v)

    echo_server.reset()  # a rebuild is answered from the LLM cache: no call, same version
    again = build_preferences(st, params)
    assert echo_server.calls == 0 and not again.created and again.version.hash == v.hash


def _said(text: str) -> int | None:
    """The first label word in a generation, whole word, any case (written here, not the toolkit's parser)."""
    m = re.search(r"\b(unethical|ethical)\b", text, re.IGNORECASE)
    return None if m is None else {"ethical": 0, "unethical": 1}[m.group(1).lower()]


def test_student_answers_kept_only_when_wrong(dfar_store: DatasetStore, tok: Any, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SmolLM2 run folder (merged weights, as --save-merged writes) answers the 6 DFAR prompts."""
    from curate.models import ModelRef, load_causal_lm
    from train.modeling import clear_gguf_marker

    st = _fresh(dfar_store, tmp_path)
    model = load_causal_lm(ModelRef.parse("smollm2"), device="cpu")
    clear_gguf_marker(model)
    run = tmp_path / "run"
    model.save_pretrained(run / "merged")
    tok.save_pretrained(run / "merged")
    (run / "run.json").write_text(json.dumps({"template": "plain", "config": {}}))

    result = build_preferences(st, PreferencesConfig(from_dataset="dfar", rejected=f"student:{run}",
                                                     max_new_tokens=10, batch_size=1))
    want, right, unparsed = {}, 0, 0
    for r in _dfar_rows(st).iter_rows(named=True):
        text = _greedy(model, tok, list(tok(r["prompt"]).input_ids), 10)
        said = _said(text)
        if said is None:
            unparsed += 1
        elif said == r["label"]:
            right += 1
        else:
            want[r["id"]] = (r["completion"], text.rstrip())
    got = {p["id"]: (p["chosen"], p["rejected"]) for p in result.version.read("pairs").to_pylist()}
    assert want and got == want
    dropped = result.version.manifest["params"]["counts"]["dropped"]
    assert dropped.get("student_right", 0) == right and dropped.get("student_unparsed", 0) == unparsed
    assert right + unparsed + len(want) == 6
    _check_sides(result.version)
    monkeypatch.setattr("train.modeling.load_causal_lm", _no_weights)  # a rebuild reads the logged answers
    again = build_preferences(st, PreferencesConfig(from_dataset="dfar", rejected=f"student:{run}",
                                                    max_new_tokens=10, batch_size=1))
    assert not again.created and again.version.hash == result.version.hash


# ---- files ------------------------------------------------------------------------------------------------
def test_chat_message_layout(store: DatasetStore) -> None:
    v = build_preferences(store, PreferencesConfig(source=str(DATA / "chat.jsonl"))).version
    rows = v.read("pairs").to_pylist()
    assert [r["prompt"] for r in rows] == [
        "Is it fine to keep a wallet I found?",
        "System: You are a careful assistant.\n\nUser: My friend lied to me.\n\nAssistant: That hurts.\n\n"
        "User: Should I lie back?\n\nAssistant:",
        "Should I tell my boss about my mistake?",
    ]
    assert [r["chosen"] for r in rows] == ["No, return it to its owner.", "No; talk to them honestly.",
                                           "Yes, owning it builds trust."]
    assert [r["rejected"] for r in rows] == ["Yes, finders keepers.", "Yes, pay them back in kind.",
                                             "No, hide it."]
    assert all(r["split"] == "train" and r["label"] is None and r["rejected_source"] == "source" for r in rows)
    # no id column: content-hash ids
    assert [r["id"] for r in rows] == [
        hashlib.sha256("\0".join((r["prompt"], r["chosen"], r["rejected"])).encode()).hexdigest()[:16] for r in rows]
    _check_sides(v)
    assert v.manifest["sources"][0]["location"] == str((DATA / "chat.jsonl").resolve())


def test_plain_layout_splits_ids_and_overlap(store: DatasetStore) -> None:
    result = build_preferences(store, PreferencesConfig(source=str(DATA / "plain.jsonl")))
    v = result.version
    src = pl.read_ndjson(DATA / "plain.jsonl")
    test_prompts = set(src.filter(pl.col("split") == "test")["prompt"])
    kept = src.filter((pl.col("split") == "test") | ~pl.col("prompt").is_in(list(test_prompts)))
    assert v.splits("pairs") == ["train", "test"]
    got = pl.from_arrow(v.read("pairs")).select("id", "prompt", "chosen", "rejected", "split")
    assert got.sort("id").rows() == kept.select("id", "prompt", "chosen", "rejected", "split").sort("id").rows()
    assert v.manifest["params"]["counts"]["train_prompts_in_test_dropped"] == src.height - kept.height == 1
    assert any("share their prompt with a test pair" in n for n in result.notes)


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_other_formats_and_a_held_out_fraction(store: DatasetStore, tmp_path: Path, ext: str) -> None:
    src = pl.read_ndjson(DATA / "plain.jsonl").drop("split", "id")
    path = tmp_path / f"pairs.{ext}"
    src.write_csv(path) if ext == "csv" else src.write_parquet(path)
    v = build_preferences(store, PreferencesConfig(source=str(path), test_fraction=0.5, seed=3)).version

    def draw(prompt: str) -> float:
        return int.from_bytes(hashlib.sha256(f"3\0{prompt}".encode()).digest()[:8], "big") / 2**64

    split_of = {p: ("test" if draw(p) < 0.5 else "train") for p in src["prompt"]}
    rows = v.read("pairs").to_pylist()
    assert {r["prompt"]: r["split"] for r in rows} == split_of and set(split_of.values()) == {"train", "test"}
    assert len(rows) == src.height  # the repeated prompt lands in one split: nothing to drop


def _write(tmp_path: Path, name: str, lines: list[Any]) -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


OK = {"prompt": "p1", "chosen": "good", "rejected": "bad"}
MSG = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(("rows", "row", "message"), [
    ([OK, {"prompt": "p2", "chosen": "same", "rejected": "same"}], 2, "chosen and rejected are identical"),
    ([OK, OK, {"prompt": "p3", "chosen": "  ", "rejected": "bad"}], 3, "empty chosen"),
    ([OK, {"prompt": "", "chosen": "a", "rejected": "b"}], 2, "empty prompt"),
    ([OK, {"prompt": "p2", "chosen": "a", "rejected": None}], 2, "empty rejected"),
    ([OK, {"prompt": "p2", "chosen": {"text": "a"}, "rejected": "b"}], 2, "chosen must be a string or a non-empty"),
    ([OK, {"prompt": "p2", "chosen": [{"role": "user"}, MSG[1]], "rejected": "b"}], 2,
     "chosen message 0 is not a {role: str, content: str} object"),
    ([{"prompt": "p", "chosen": 1, "rejected": 2}], 1, "chosen must be a string or a non-empty list"),
    ([{"chosen": MSG, "rejected": [MSG[0], {"role": "user", "content": "b"}]}], 1,
     "the last rejected message is 'user'"),
    ([{"chosen": MSG, "rejected": [{"role": "user", "content": "other"}, MSG[1] | {"content": "b"}]}], 1,
     "chosen and rejected continue different conversations"),
    ([{"chosen": "a", "rejected": "b"}], 1, "no prompt"),
])
def test_each_input_error_names_file_and_row(store: DatasetStore, tmp_path: Path, rows: list[Any], row: int,
                                             message: str) -> None:
    path = _write(tmp_path, "bad.jsonl", rows)
    with pytest.raises(CurateError) as e:
        build_preferences(store, PreferencesConfig(source=str(path)))
    assert str(e.value).startswith(f"{path}, row {row}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_column_and_csv_rows(store: DatasetStore, tmp_path: Path) -> None:
    path = _write(tmp_path, "nocol.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(CurateError, match=re.escape(f"{path}: missing column(s) rejected")):
        build_preferences(store, PreferencesConfig(source=str(path)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(OK) + "\n" + '{"prompt": "p2", "chosen": "a", "rejected": \n')
    with pytest.raises(CurateError, match=re.escape(f"{broken}, row 2: not JSON")):
        build_preferences(store, PreferencesConfig(source=str(broken)))
    csv = tmp_path / "bad.csv"
    csv.write_text("prompt,chosen,rejected\np1,a,b\np2,,b\n")  # header is row 1, as everywhere in the toolkit
    with pytest.raises(CurateError, match=re.escape(f"{csv}, row 3: empty chosen")):
        build_preferences(store, PreferencesConfig(source=str(csv)))


def test_config_errors(store: DatasetStore) -> None:
    with pytest.raises(CurateError, match="exactly one of --from"):
        build_preferences(store, PreferencesConfig())
    with pytest.raises(CurateError, match="--rejected must be"):
        build_preferences(store, PreferencesConfig(from_dataset="dfar", rejected="gpt-4"))
    with pytest.raises(CurateError, match="--from needs --rejected"):
        build_preferences(store, PreferencesConfig(from_dataset="dfar"))


def test_cli_help_and_a_real_build(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["build", "preferences", "--help"])
    assert shown.exit_code == 0
    text = " ".join(shown.output.split())
    assert "--rejected" in text and "--from" in text and "[default: preferences]" in text

    args = ["build", "preferences", "--source", str(DATA / "chat.jsonl"), "--store", str(tmp_path / "s"),
            "--name", "chatprefs"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "built chatprefs@v1" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "unchanged, already stored as chatprefs@v1" in second.output
    bad = runner.invoke(app, ["build", "preferences", "--from", "dfar", "--rejected", "x",
                              "--store", str(tmp_path / "s")])
    assert bad.exit_code != 0 and "--rejected must be" in bad.output and "Traceback" not in bad.output
