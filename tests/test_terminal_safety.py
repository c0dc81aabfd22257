"""Data and manifests are anyone's text (a pulled Hub repo): printing them never crashes, never styles the
terminal, never makes a hyperlink, and never lets escape sequences through; cards never carry raw HTML."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.color import ColorSystem
from typer.testing import CliRunner, Result

from curate.cli import app
from curate.commands._app import console
from curate.store import MANIFEST, DatasetStore

MARKUP_CLOSE = "[/bold] closes nothing"
LINK = "[link=https://evil.example]x[/link]"
ANSI = "\x1b[31mred\x1b[0m"
OSC8 = "\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\"
SCRIPT = "<script>alert(1)</script>"
EVIL = [MARKUP_CLOSE, LINK, ANSI, OSC8, SCRIPT]
EVIL_DIR = "[bold]src[/bold] [link=file:/evil]y[/link]"  # nested folders: the path as a whole is markup


@pytest.fixture
def evil_source(tmp_path: Path, dfar_source: Path) -> Path:
    """Real DFAR rows plus statements carrying markup, ANSI, OSC-8 and HTML, each twice (so the build notes
    quote them as duplicates), in a folder whose own name is markup."""
    src = tmp_path / EVIL_DIR
    src.mkdir(parents=True)
    for name in ("DFAR_trainset.csv", "DFAR_testset.csv"):
        with open(dfar_source / name, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))[:31]
        if name == "DFAR_trainset.csv":
            rows += [[f"I wrote {e} on the wall.", "1", f"Because {e} is vandalism."] for e in EVIL] * 2
        with open(src / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    return src


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _clean(res: Result) -> str:
    """Exit 0, no exception, and not one ESC byte (this console is not a terminal, so Rich adds none)."""
    assert res.exit_code == 0 and res.exception is None, (res.output, res.exception)
    assert "\x1b" not in res.output
    return res.output


def _build(src: Path, store: Path) -> str:
    return _clean(_invoke("build", "dfar", "--source", str(src), "--store", str(store)))


def test_build_report_query_show_datasets(evil_source: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = _build(evil_source, store)
    assert "duplicate statement" in out and MARKUP_CLOSE in out and LINK in out  # printed, as text
    assert "\\x1b[31mred" in out  # the note's repr already shows it; safe() keeps it that way

    out = _clean(_invoke("query", "SELECT statement, reason FROM dfar WHERE statement LIKE 'I wrote%'",
                         "--store", str(store)))
    for e in (MARKUP_CLOSE, LINK, SCRIPT):
        assert e in out
    assert "\\x1b[31mred\\x1b[0m" in out and "\\x1b]8;;https://evil.example" in out  # visible, inert
    out = _clean(_invoke("show", "dfar", "--store", str(store)))
    assert EVIL_DIR in out  # the source folder name, as text
    out = _clean(_invoke("datasets", "--store", str(store)))
    assert "dfar" in out


def test_no_hyperlink_or_raw_escape_on_a_terminal(evil_source: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With a true-colour terminal console Rich would turn `[link=…]` into OSC-8: data must not."""
    store = tmp_path / "store"
    _build(evil_source, store)
    monkeypatch.setattr(console, "_force_terminal", True)
    monkeypatch.setattr(console, "_color_system", ColorSystem.TRUECOLOR)
    for args, literal in ((["query", "SELECT statement FROM dfar WHERE statement LIKE 'I wrote%'"], LINK),
                          (["show", "dfar"], "[link=file:/evil]y[/link]"),
                          (["build", "dfar", "--source", str(evil_source)], LINK)):
        res = _invoke(*args, "--store", str(store))
        assert res.exit_code == 0 and res.exception is None, (args, res.output)
        assert "\x1b]8" not in res.output, args  # no hyperlink at all
        assert "\x1b[31mred" not in res.output and literal in res.output, args


def test_csv_and_json_keep_the_data_exactly(evil_source: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    _build(evil_source, store)
    v = DatasetStore(store).get("dfar")
    expected = sorted(s for s in v.read("default").column("statement").to_pylist() if s.startswith("I wrote"))
    res = _invoke("query", "SELECT statement FROM dfar WHERE statement LIKE 'I wrote%' ORDER BY 1",
                  "--store", str(store), "--format", "json")
    assert res.exit_code == 0
    assert [r["statement"] for r in json.loads(res.stdout)] == expected  # off a terminal: unchanged data


def test_manifest_fields_from_a_pulled_repo(tmp_path: Path, dfar_source: Path) -> None:
    """A pulled manifest is someone else's JSON: its builder name, source location, created-at and origin
    are printed as text by show / datasets / query --list."""
    from builders.dfar import DfarConfig, build_dfar

    st = DatasetStore(tmp_path / "store")
    v = build_dfar(st, dfar_source, DfarConfig(limit=50)).version
    m = json.loads((v.path / MANIFEST).read_text())
    m["builder"]["name"] = f"{MARKUP_CLOSE} {LINK} {ANSI}"
    m["builder"]["version"] = "[/]"
    m["sources"][0]["location"] = f"{OSC8} [bold]x"
    m["created_at"] = f"{ANSI}[/link]"
    m["origin"] = {"hub": LINK, "revision": "[/bold]", "commit": ANSI, "endpoint": OSC8}
    m["configs"]["default"]["train"]["num_rows"] = 1  # a lie about rows is still printed, not trusted
    (v.path / MANIFEST).write_text(json.dumps(m))
    root = str(st.root)
    out = _clean(_invoke("show", "dfar", "--store", root))
    assert LINK in out and MARKUP_CLOSE in out and "\\x1b]8;;https://evil.example" in out
    out = _clean(_invoke("datasets", "--store", root))
    assert MARKUP_CLOSE in " ".join(out.split())
    _clean(_invoke("query", "--list", "--store", root))
    out = _clean(_invoke("show", "dfar", "--manifest", "--store", root))
    assert "\\u001b" in out


def test_card_escapes_html_from_data(evil_source: Path, tmp_path: Path) -> None:
    """The card quotes duplicate statements in its build notes: as escaped HTML, never a raw <script>."""
    store = tmp_path / "store"
    _build(evil_source, store)
    card = DatasetStore(store).get("dfar").card_path.read_text()
    body = card.split("\n---\n", 1)[1]
    assert "alert(1)" in body  # the note is there ...
    assert "<script>" not in body and "&lt;script&gt;" in body  # ... escaped
    assert "\x1b" not in body


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[31mred", "\\x1b[31mred"),  # 7-bit CSI
        ("\x9b31mred", "\\x9b31mred"),  # 8-bit CSI
        ("\x1b]8;;https://evil.example\x07x", "\\x1b]8;;https://evil.example\\x07x"),  # OSC-8 hyperlink
        ("abc\u202edef", "abc\\u202edef"),  # right-to-left override
        ("[/bold] é 中\tok\n", "\\[/bold] é 中\tok\n"),  # markup escaped; ordinary text, tab, newline kept
    ],
)
def test_safe_makes_controls_visible(raw: str, shown: str) -> None:
    from curate.commands._app import safe

    assert safe(raw) == shown
