"""One real-browser test of `curate view`: headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium) on a built store filters rows, opens a teacher-logit token, looks at a SaGE question, annotates four
pair items as two annotators (one answer changed), exports, and checks the exported version and its α against
a value computed by hand. With CURATE_SCREENSHOTS=1 it writes the README's screenshots to docs/img/."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from curate import annotate as ann
from curate.agreement import alpha, compute_agreement
from curate.logit_codec import load_cache
from curate.store import DatasetStore
from curate.view.app import create_app
from tests.conftest import REPO
from tests.test_view_data import CACHE_K, store_copy


def _exe(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run `just install-browser` (apt-get install chromium "
                    "chromium-driver)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, DatasetStore]]:
    st = store_copy(tmp_path_factory.mktemp("browser"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(st), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", st
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = _exe("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1150,760", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(_exe("chromedriver")))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def test_look_filter_logits_annotate_export(server: tuple[str, DatasetStore], browser: WebDriver,
                                            tmp_path: Path) -> None:
    base, st = server
    shots = REPO / "docs" / "img" if os.environ.get("CURATE_SCREENSHOTS") else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(browser, 20)

    def shot(name: str) -> None:
        path = shots / f"view-{name}.png"
        browser.save_screenshot(str(path))
        assert path.stat().st_size > 5_000

    task = ann.create_pair_task(st, "pairs", "sage-responses", n=4, seed=0)
    # datasets and lineage
    browser.get(base + "/")
    assert [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#datasets td:first-child a")] == st.names()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#lineage-svg line.edge")) == 1
    shot("datasets")
    browser.find_element(By.LINK_TEXT, "dfar").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "dfar@v1")
    shot("version")

    # rows: a WHERE filter typed into the box
    browser.get(base + "/d/dfar/v1/rows/lr")
    box = browser.find_element(By.ID, "where")
    box.send_keys("label = 1 AND split = 'train'")
    browser.find_element(By.ID, "apply").click()
    wait.until(lambda d: "label" in d.current_url)
    df = st.get("dfar").read_polars("lr")
    want = df.filter((df["label"] == 1) & (df["split"] == "train"))["id"].to_list()
    got = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#rows tr td:first-child")]
    assert got == want and browser.find_element(By.ID, "count").text.startswith(f"{len(want)} rows")
    shot("rows")

    # a teacher-logit token: its top-k, decoded, with probabilities and residual
    browser.get(base + "/d/dfar-lr-logits/v1")
    browser.find_element(By.ID, "first-logit-row").click()
    tokens = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tokens .tok"))
    ex = load_cache(st.get("dfar-lr-logits"))[0]
    assert len(tokens) == len(ex.target_ids)
    tokens[2].click()
    wait.until(lambda d: d.find_element(By.ID, "token-detail").is_displayed())
    rows = browser.find_elements(By.CSS_SELECTOR, "#topk tbody tr")
    assert len(rows) == CACHE_K
    assert [int(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows] == ex.topk_ids[2].tolist()
    probs = [float(r.find_elements(By.TAG_NAME, "td")[3].text) for r in rows]
    assert probs == pytest.approx(np.exp(ex.topk_logprobs[2]).tolist(), abs=1e-5)
    assert float(browser.find_element(By.ID, "tok-residual").text) == pytest.approx(float(ex.residual[2]), rel=1e-3)
    shot("logits")

    # a SaGE question: the slider changes which edges are drawn
    qid = task.items[0]["question_id"]
    browser.get(f"{base}/d/sage-responses/v1/sage/{qid}")
    edges = lambda d: len(d.find_elements(By.CSS_SELECTOR, "#graph-svg line.edge"))  # noqa: E731
    browser.execute_script("const s = document.getElementById('edge-threshold'); s.value = '0'; "
                           "s.dispatchEvent(new Event('input'));")
    assert edges(browser) == 10
    browser.execute_script("const s = document.getElementById('edge-threshold'); s.value = '0.7'; "
                           "s.dispatchEvent(new Event('input'));")
    shot("sage")
    browser.execute_script("const s = document.getElementById('edge-threshold'); s.value = '1'; "
                           "s.dispatchEvent(new Event('input'));")
    assert edges(browser) == 0

    # annotate: alice types y n y y, then changes her last answer to n; bob types y n n a
    def annotate(who: str, keys: str, change_last: str | None = None) -> None:
        browser.get(base + "/annotate")
        name = browser.find_element(By.ID, "annotator")
        name.clear()  # the page remembers the last name typed in this browser
        name.send_keys(who)
        browser.find_element(By.LINK_TEXT, "pairs").click()
        wait.until(lambda d: d.find_element(By.ID, "progress").text == "0 of 4 done")
        body = browser.find_element(By.TAG_NAME, "body")
        for i, key in enumerate(keys, 1):
            body.send_keys(key)
            wait.until(lambda d, i=i: d.find_element(By.ID, "progress").text == f"{i} of 4 done")
        if change_last:
            wait.until(lambda d: d.find_element(By.ID, "position").text == "4 / 4")
            body.send_keys(Keys.ARROW_LEFT)
            body.send_keys(Keys.ARROW_RIGHT)
            body.send_keys(change_last)
            wait.until(lambda d: f"same = {'N' if change_last == 'n' else change_last}"
                       in d.find_element(By.ID, "status").text)

    annotate("alice", "ynyy", change_last="n")
    shot("annotate")
    annotate("bob", "ynna")
    browser.find_element(By.ID, "export").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("exported annotations@"))

    v = st.get("annotations")
    assert v.manifest["params"]["task"] == "pairs" and v.manifest["parents"][0]["name"] == "sage-responses"
    final = v.read_polars("judgments")
    items = v.read_polars("items")["item_id"].to_list()
    assert items == task.item_ids()
    table = {(r["annotator"], r["item_id"]): r["value"] for r in final.to_dicts()}
    assert [table[("alice", i)] for i in items] == ["Y", "N", "Y", "N"]
    assert [table[("bob", i)] for i in items] == ["Y", "N", "N", "NA"]
    history = v.read_polars("history")
    assert history.height == 9 and history.filter(history["annotator"] == "alice")["value"].to_list()[-2:] == ["Y", "N"]
    # By hand: item 4 has one value (bob's NA is missing), so 3 pairable items: (Y,Y), (N,N), (Y,N).
    # Coincidences o_YY = 2, o_NN = 2, o_YN = o_NY = 1; n_Y = n_N = 3, n = 6.
    # alpha = 1 - (n - 1) * (o_YN + o_NY) / (n_Y n_N + n_N n_Y) = 1 - 5 * 2 / 18 = 4/9.
    codes = {"Y": 1.0, "N": 0.0}
    m = np.array([[codes.get(table[(w, i)], np.nan) for i in items] for w in ("alice", "bob")])
    assert alpha(m) == pytest.approx(4 / 9, abs=1e-9)
    res = compute_agreement(ann.load_task(st, "pairs"), ann.Judgments(ann.load_task(st, "pairs")), bootstrap=50)
    assert res["fields"]["same"]["alpha"] == pytest.approx(4 / 9, abs=1e-4)
