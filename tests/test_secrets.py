"""No credentials in anything a build writes (manifest, card, response cache, logs, console output).

Distinct secrets are planted through every route a user has: the environment (OPENAI_API_KEY, HF_TOKEN),
`--base-url` userinfo and query string, `--target-base-url`'s query string, and the endpoint configured in
$OPENAI_BASE_URL. The SaGE-responses build runs against the replay server (the real openai SDK over HTTP),
then every file under the store and every log line is searched for each secret, as bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.urls import redact_url

from .conftest import shared
from .openai_server.fixture import OpenAIServer, openai_server  # noqa: F401

SECRETS = {
    "env_openai": "sk-PLANTED-env-openai-7d1f",
    "env_hf": "hf_PLANTEDenvhf9c2e",
    "userinfo_user": "PLANTEDuser3a5b",
    "userinfo_password": "PLANTED-pass-8e4c",
    "query_api_key": "PLANTED-query-apikey-1b7d",
    "query_token": "PLANTED-query-token-6f0a",
    "target_query_key": "PLANTED-target-key-2c9e",
    "config_password": "PLANTED-config-pass-5d3f",
    "questions_password": "PLANTED-questions-pass-4a8b",
    "questions_token": "PLANTED-questions-token-0e6d",
}


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """Every log record of the toolkit, the SDK and httpx, at DEBUG, into one file."""
    from curate.commands._app import setup_output

    setup_output()  # the CLI's own logging set-up first, so what is saved and restored below is its state
    path = tmp_path / "all.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    names = ["", "curate", "builders", "httpx", "httpcore", "openai"]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).addHandler(handler)
        logging.getLogger(n).setLevel(logging.DEBUG)
    yield path
    for n in names:
        logging.getLogger(n).removeHandler(handler)
        logging.getLogger(n).setLevel(saved[n])
    handler.close()


def _leaks(root: Path, texts: dict[str, str]) -> list[str]:
    found = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        data = f.read_bytes()
        found += [f"{name} in {f.relative_to(root)}" for name, secret in SECRETS.items() if secret.encode() in data]
    for where, text in texts.items():
        found += [f"{name} in {where}" for name, secret in SECRETS.items() if secret in text]
    return found


def test_no_secret_is_written_anywhere(
    openai_server: OpenAIServer, tmp_path: Path, log_file: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    questions = shared("sage", "quality100", "q100.csv")
    store = tmp_path / "store"
    port = openai_server.port
    monkeypatch.setenv("OPENAI_API_KEY", SECRETS["env_openai"])
    monkeypatch.setenv("HF_TOKEN", SECRETS["env_hf"])
    base = (f"http://{SECRETS['userinfo_user']}:{SECRETS['userinfo_password']}@127.0.0.1:{port}/v1"
            f"?api_key={SECRETS['query_api_key']}&token={SECRETS['query_token']}")
    target = f"http://127.0.0.1:{port}/v1?key={SECRETS['target_query_key']}"
    common = ["--questions", str(questions), "--limit-questions", "2", "--store", str(store)]
    runner = CliRunner()
    first = runner.invoke(app, ["build", "sage-responses", *common, "--base-url", base, "--target-model", "smol",
                                "--target-base-url", target, "--name", "with-flags"])
    assert first.exit_code == 0, first.output
    # the endpoint configured in the environment instead of on the command line
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://cfg:{SECRETS['config_password']}@127.0.0.1:{port}/v1")
    second = runner.invoke(app, ["build", "sage-responses", *common, "--name", "from-config"])
    assert second.exit_code == 0, second.output
    # a questions "path" that is a URL with credentials: refused in one line that does not repeat them
    url_q = (f"https://reader:{SECRETS['questions_password']}@data.example.invalid/q100.csv"
             f"?token={SECRETS['questions_token']}")
    third = runner.invoke(app, ["build", "sage-responses", "--questions", url_q, "--store", str(store)])
    assert third.exit_code == 1 and "is not a file" in third.output and "Traceback" not in third.output

    # the builds really ran through those URLs and recorded them, redacted
    for name, url in (("with-flags", base), ("from-config", f"http://cfg:x@127.0.0.1:{port}/v1")):
        manifest = (store / "datasets" / name / "versions").glob("*/manifest.json")
        text = next(manifest).read_text()
        assert f'"base_url": "{redact_url(url)}"' in text and f"127.0.0.1:{port}/v1" in text
    assert openai_server.calls > 0 and any((store / "llm_cache").rglob("responses.sqlite"))
    assert log_file.stat().st_size > 0, "the log capture saw the run"
    leaks = _leaks(store, {"log": log_file.read_text(), "first output": first.output,
                           "second output": second.output, "third output": third.output})
    assert leaks == []


def test_redact_url_cases() -> None:
    """One function decides what of a URL is written: no userinfo, no credential-like query parameters."""
    assert redact_url("http://u:p@host:8000/v1?api_key=a&v=2&key=b&token=c&X-Api-Key=d#frag") == \
        "http://host:8000/v1?v=2"
    assert redact_url("https://api.openai.com/v1") == "https://api.openai.com/v1"
    assert redact_url("/data/q100.csv") == "/data/q100.csv" and redact_url(None) is None
    assert redact_url("http://[::1]:8080/v1?access_token=z&sig=y") == "http://[::1]:8080/v1"
    assert redact_url("http://host:99999999/v1") == "REDACTED"  # unparseable: nothing of it is kept
    from curate.llm import LLMConfig

    assert SECRETS["userinfo_password"] not in repr(LLMConfig(base_url=f"http://u:{SECRETS['userinfo_password']}@h"))
