"""`curate view` pages and actions through FastAPI's TestClient on a real store: datasets, versions, cards and
lineage, rows (paging, WHERE, search), teacher-logit rows, SaGE questions, annotation API; escaping, paths, the
read-only WHERE box, a port in use, and judgments surviving a killed server."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from html import unescape
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from curate import annotate as ann
from curate.cli import app
from curate.logit_codec import load_cache
from curate.store import DatasetStore
from curate.view.app import create_app
from tests.conftest import REPO
from tests.test_view_data import CACHE_K, store_copy

EVIL = "<script>alert('x')</script><img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    st = store_copy(tmp_path_factory.mktemp("view"))
    with st.new_version("evil", builder="test", builder_version="1", params={"note": EVIL}, sources=[],
                        card={"description": EVIL}) as w:
        w.write_table("default", "train", pa.table({"id": ["1", "2"], "text": [EVIL, "plain & simple"]}))
    return st


@pytest.fixture(scope="module")
def client(st: DatasetStore) -> TestClient:
    return TestClient(create_app(st))


def cells(html: str, table_id: str) -> list[list[str]]:
    body = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    return [[unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
            for r in re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]]


def error_of(html: str) -> str:
    m = re.search(r'class="error"[^>]*>(.*?)<', html, re.S)
    return unescape(m.group(1)) if m else ""


def test_index_version_card_and_lineage(client: TestClient, st: DatasetStore) -> None:
    r = client.get("/")
    assert r.status_code == 200
    names = [row[0] for row in cells(r.text, "datasets")]
    assert names == st.names()
    lineage = json.loads(unescape(r.text.split('id="lineage-data">', 1)[1].split("</script>", 1)[0]))
    cache = st.get("dfar-lr-logits")
    edge = next(e for e in lineage["edges"] if e["to"] == cache.hash[:16])
    assert edge["parent"] == "dfar@v1" and edge["from"] == st.get("dfar").hash[:16]

    assert client.get("/d/dfar", follow_redirects=False).headers["location"] == "/d/dfar/v1"
    page = client.get("/d/dfar/v1").text
    assert 'class="child" href="/d/dfar-lr-logits/v1"' in page
    assert [r[:3] for r in cells(page, "configs")][:2] == [["default (default)", "train", "6"],
                                                          ["default (default)", "test", "6"]]
    assert "dfar" in unescape(page.split('id="card">', 1)[1]) and st.get("dfar").hash in page
    cpage = client.get(f"/d/dfar-lr-logits/{cache.hash[:8]}").text
    assert 'class="parent" href="/d/dfar/v1"' in cpage and 'id="first-logit-row"' in cpage


def test_rows_paging_where_and_search(client: TestClient, st: DatasetStore) -> None:
    df = st.get("dfar").read_polars("lr")
    r = client.get("/d/dfar/v1/rows/lr", params={"split": "train"})
    rows = cells(r.text, "rows")
    assert len(rows) == 6 and "6 rows" in r.text
    expected = df.filter(df["split"] == "train")
    assert [row[0] for row in rows] == expected["id"].to_list()
    r = client.get("/d/dfar/v1/rows/lr", params={"where": "label = 1 AND split = 'test'"})
    want = df.filter((df["label"] == 1) & (df["split"] == "test"))["id"].to_list()
    assert sorted(row[0] for row in cells(r.text, "rows")) == sorted(want) and not error_of(r.text)
    word = df["completion"][0].split()[1]
    r = client.get("/d/dfar/v1/rows/lr", params={"q": word.upper()})
    hits = df.filter(df["prompt"].str.to_lowercase().str.contains(word.lower(), literal=True)
                     | df["completion"].str.to_lowercase().str.contains(word.lower(), literal=True)
                     | df["id"].str.to_lowercase().str.contains(word.lower(), literal=True)
                     | df["split"].str.contains(word.lower(), literal=True))
    assert f"{hits.height} rows" in r.text
    r = client.get("/d/dfar/v1/rows/lr", params={"page": 1, "size": 5})
    assert [row[0] for row in cells(r.text, "rows")] == df["id"].to_list()[5:10] and "page 2 of 3" in r.text
    assert 'id="next"' in r.text and 'id="prev"' in r.text and "size=5&amp;page=2" in r.text


@pytest.mark.parametrize("where, message", [
    ("id IN (SELECT column0 FROM read_csv('/etc/passwd'))", "file system operations are disabled"),
    ("1=1; COPY (SELECT 1) TO '/tmp/x.csv'", "';' is not allowed"),
    ("(SELECT count(*) FROM read_parquet('/etc/*.parquet')) > 0", "disabled by configuration"),
    ("EXISTS (SELECT * FROM query('ATTACH ''/tmp/x.db'' AS x'))", "Expected a single SELECT statement"),
    ("EXISTS (SELECT * FROM glob('/etc/*'))", "disabled by configuration"),
    ("EXISTS (SELECT * FROM read_json_auto('https://example.com/x.json'))", "disabled by configuration"),
    ("label = 1) UNION ALL (SELECT * FROM rows", "WHERE:"),
    ("no_such_column = 3", 'Referenced column "no_such_column" not found'),
    ("label = ", "WHERE:"),
])
def test_where_box_refuses_files_and_shows_one_line(client: TestClient, where: str, message: str) -> None:
    r = client.get("/d/dfar/v1/rows/default", params={"where": where})
    assert r.status_code == 200
    err = error_of(r.text)
    assert message in err and "\n" not in err and 'id="rows"' not in r.text
    assert not Path("/tmp/x.csv").exists() and not Path("/tmp/x.db").exists()


def test_logit_row_tokens_topk_and_residual(client: TestClient, st: DatasetStore) -> None:
    from tests.tiny import smollm2_tokenizer

    cache = st.get("dfar-lr-logits")
    ex = load_cache(cache, "test")[1]
    r = client.get("/d/dfar-lr-logits/v1/logits/1", params={"split": "test"})
    assert r.status_code == 200
    row = json.loads(unescape(r.text.split('id="logit-data">', 1)[1].split("</script>", 1)[0]))
    tok = smollm2_tokenizer()
    assert row["id"] == ex.id and row["decoded"] and len(row["tokens"]) == len(ex.target_ids)
    t = row["tokens"][3]
    assert t["id"] == int(ex.target_ids[3]) and t["text"] == tok.decode([int(ex.target_ids[3])])
    assert [c["id"] for c in t["topk"]] == ex.topk_ids[3].tolist() and len(t["topk"]) == CACHE_K
    assert [c["text"] for c in t["topk"]] == [tok.decode([i]) for i in ex.topk_ids[3].tolist()]
    probs = np.exp(ex.topk_logprobs[3])
    assert [c["prob"] for c in t["topk"]] == pytest.approx(probs.tolist(), rel=1e-5)
    assert t["residual"] == pytest.approx(float(ex.residual[3]), rel=1e-3)
    assert sum(c["prob"] for c in t["topk"]) + t["residual"] == pytest.approx(1.0, abs=5e-3)
    assert t["entropy"] == pytest.approx(float(ex.entropy[3]), abs=1e-3)
    assert client.get("/d/dfar-lr-logits/v1/logits/99").status_code == 404
    assert "is not a teacher-logit cache" in error_of(client.get("/d/dfar/v1/logits/0").text)


def test_sage_question_graph_and_score(client: TestClient, st: DatasetStore) -> None:
    resp = st.get("sage-responses").read_polars("responses")
    qid = resp["question_id"][0]
    r = client.get(f"/d/sage-responses/v1/sage/{qid}")
    assert r.status_code == 200
    q = json.loads(unescape(r.text.split('id="sage-data">', 1)[1].split("</script>", 1)[0]))
    rows = resp.filter(resp["question_id"] == qid)
    assert [n["answer"] for n in q["nodes"]] == rows["model_output"].to_list()
    assert q["sage"] == pytest.approx(rows["sage"][0]) and len(q["edges"]) == 10
    # the score recomputed from the page's own edge weights and RoT nodes (SaGE's graph entropy)
    from curate.sage import graph_entropy_score

    w = np.eye(5)
    for e in q["edges"]:
        w[e["a"], e["b"]] = w[e["b"], e["a"]] = e["w"]
    res = graph_entropy_score(w, None, [n["rot"] for n in q["nodes"]])
    assert res.sage == pytest.approx(rows["sage"][0], abs=1e-3)
    assert f"/d/sage-responses/v1/sage/{qid}" in client.get("/d/sage-responses/v1").text
    assert client.get("/d/sage-responses/v1/sage/nope").status_code == 404


def test_data_is_escaped_and_paths_stay_in_the_store(client: TestClient) -> None:
    for url in ("/", "/d/evil/v1", "/d/evil/v1/rows/default"):
        text = client.get(url).text
        assert "<script>alert" not in text and "<img src=x" not in text, url
    text = client.get("/d/evil/v1/rows/default").text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text and "plain &amp; simple" in text
    assert "&lt;script&gt;" in client.get("/d/evil/v1").text  # card and params, escaped
    for url in ("/d/..%2F..%2Fetc/v1", "/d/%2Fetc/v1", "/d/Dfar/v1", "/d/dfar/..", "/d/dfar/v1/rows/..%2F..",
                "/static/../pyproject.toml", "/static/%2e%2e/app.py", "/annotate/..%2Fdatasets",
                "/d/dfar/v1/rows/default?split=../../x"):
        r = client.get(url)
        assert r.status_code in (400, 404), url
        assert "[project]" not in r.text and "def create_app" not in r.text
    assert "is not allowed" in error_of(client.get("/d/Dfar/v1").text)


def test_annotation_api_saves_at_once_and_exports(client: TestClient, st: DatasetStore) -> None:
    task = ann.create_label_task(st, "review", "dfar", n=3, seed=5)
    ids = task.item_ids()
    s = client.get("/api/annotate/review/state", params={"annotator": "ann"}).json()
    assert s["items"][0]["id"] == ids[0] and s["done"] == 0 and s["next"] == 0 and s["fields"] == ["correct",
                                                                                                    "supports"]
    for item in ids:
        for f in ("correct", "supports"):
            r = client.post("/api/annotate/review/judge", json={"item": item, "annotator": "ann", "field": f,
                                                                "value": "Y"})
            assert r.status_code == 200
            assert ann.Judgments(ann.load_task(st, "review")).latest()[(item, "ann", f)]["value"] == "Y"
    assert r.json()["done"] == 3 and r.json()["next"] is None
    client.post("/api/annotate/review/judge", json={"item": ids[0], "annotator": "ann", "field": "correct",
                                                    "value": "N"})
    s = client.get("/api/annotate/review/state", params={"annotator": "ann"}).json()
    assert s["judgments"][f"{ids[0]}|correct"] == "N"
    for body, msg in [({"item": ids[0], "annotator": "a b", "field": "correct", "value": "Y"}, "annotator name"),
                      ({"item": ids[0], "annotator": "ann", "field": "correct", "value": "maybe"}, "Y, N, NA"),
                      ({"item": "x", "annotator": "ann", "field": "correct", "value": "Y"}, "no item 'x'")]:
        r = client.post("/api/annotate/review/judge", json=body)
        assert r.status_code == 400 and msg in r.json()["error"]
    assert client.post("/api/annotate/review/judge", content=b"not json").status_code == 400
    assert client.get("/api/annotate/nope/state", params={"annotator": "a"}).status_code == 404
    r = client.post("/api/annotate/review/export").json()
    v = st.get(r["ref"])
    assert v.manifest["params"]["task"] == "review" and v.read_polars("history").height == 7
    assert client.get("/api/annotate/review/agreement").json()["annotators"] == ["ann"]
    page = client.get("/annotate").text
    assert [row[0] for row in cells(page, "tasks")] == ["review"]
    assert 'data-annotator="ann"' in client.get("/annotate/review", params={"annotator": "ann"}).text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_in_use_is_one_line(st: DatasetStore) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = CliRunner().invoke(app, ["view", "--store", str(st.root), "--port", str(port)])
    assert out.exit_code == 1
    assert out.output.strip() == f"error: port {port} on 127.0.0.1 is in use; pick another with --port"


def test_killed_server_keeps_every_judgment(st: DatasetStore) -> None:
    task = ann.create_label_task(st, "killed", "dfar", n=2, seed=1)
    port = _free_port()
    cmd = [sys.executable, "-c", "from curate.cli import main; main()", "view", "--store", str(st.root),
           "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(base + "/annotate", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.2)
        r = httpx.post(f"{base}/api/annotate/killed/judge", json={"item": task.item_ids()[1], "annotator": "zed",
                                                                  "field": "supports", "value": "NA"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0].decode()
    assert f"http://127.0.0.1:{port}/" in out
    lines = (st.root / "annotations" / "killed" / "judgments.jsonl").read_text().splitlines()
    assert [json.loads(x)["value"] for x in lines] == ["NA"]
