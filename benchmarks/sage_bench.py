"""Benchmark SaGE scoring and response collection on the real q100 data.

1. Scoring all 100 q100 questions (500 answers + 500 RoTs) with MiniLM: ``curate.sage.sage_scores``
   (every distinct text embedded once, batched) against a per-pair baseline written here that embeds the
   texts of every paraphrase pair separately, as the SaGE reference code does. Same model, one run each.
2. Collection throughput of ``curate.llm.LLMClient`` against the replay server with a fixed latency, at
   several concurrency levels, compared with the ideal ``concurrency / latency`` requests per second.
3. The same with the replay server in its own process (``python -m curate.replay``) at 50 and 200 ms, with
   the CPU time per request of client and server: at concurrency 32 and 50 ms the ideal 640 req/s needs
   ``640 × (client + server ms)`` of CPU per second, which shows when the (2-core, shared) machine is the limit.

Run: ``python benchmarks/sage_bench.py`` (writes benchmarks/results/sage_bench.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from curate.llm import LLMClient, LLMConfig  # noqa: E402
from curate.prompts import answer_messages, rot_messages  # noqa: E402
from curate.sage import graph_entropy_score, resolve_embedding_model, sage_scores  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "sage" / "quality100"
ROT_CSV = DATA / "q100_gpt_3.5_rot.csv"
EDGES_CSV = DATA / "q100_gpt_3.5_edges_minilm.csv"


def per_pair_baseline(df: pl.DataFrame, model: Any) -> dict[int, float]:
    """The reference's way: for each paraphrase pair, embed both answers and both RoTs one call each."""
    from sentence_transformers import util

    def cosine(a: str, b: str) -> float:
        ea = model.encode([a], convert_to_tensor=True, show_progress_bar=False)
        eb = model.encode([b], convert_to_tensor=True, show_progress_bar=False)
        return float(util.cos_sim(ea, eb)[0][0])

    scores = {}
    for (qid,), group in df.group_by("question_id", maintain_order=True):
        rows = group.select("model_output", "rot").rows()
        weights = [
            0.8 * cosine(r1[0], r2[0]) + 0.2 * cosine(r1[1], r2[1]) for r1, r2 in itertools.combinations(rows, 2)
        ]
        scores[int(qid)] = graph_entropy_score(np.array(weights), None, [r[1] for r in rows]).sage
    return scores


def reference_scores() -> dict[int, float]:
    """SaGE implied by the reference MiniLM edges file (0.8/0.2 mixed cosines already stored)."""
    edges = pl.read_csv(EDGES_CSV)
    out = {}
    for (qid,), group in edges.group_by("question_id", maintain_order=True):
        rots = list(dict.fromkeys(itertools.chain.from_iterable(group.select("rot_1", "rot_2").rows())))
        out[int(qid)] = graph_entropy_score(group["cosine_rot"].to_numpy(), None, rots).sage
    return out


def bench_scoring(skip_baseline: bool) -> dict[str, Any]:
    df = pl.read_csv(ROT_CSV)
    t0 = time.perf_counter()
    model = resolve_embedding_model()
    load_s = time.perf_counter() - t0
    model.encode(["warm-up"], show_progress_bar=False)

    # Wall time is what a user waits; process CPU time (all threads) is also reported because it is far
    # less sensitive to other jobs sharing the machine.
    t0, c0 = time.perf_counter(), time.process_time()
    ours = sage_scores(df, model=model)
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    ours_map = dict(zip(ours["question_id"].to_list(), ours["sage"].to_list(), strict=True))
    ref = reference_scores()
    result: dict[str, Any] = {
        "questions": ours.height,
        "texts": 2 * df.height,
        "distinct_texts": len(set(df["model_output"]) | set(df["rot"])),
        "model_load_s": load_s,
        "ours_s": ours_s,
        "ours_cpu_s": ours_cpu,
        "ours_mean_sage": float(np.mean(list(ours_map.values()))),
        "reference_mean_sage": float(np.mean(list(ref.values()))),
        "max_abs_diff_vs_reference_edges": max(abs(ours_map[q] - ref[q]) for q in ref),
    }
    if not skip_baseline:
        t0, c0 = time.perf_counter(), time.process_time()
        base = per_pair_baseline(df, model)
        base_s, base_cpu = time.perf_counter() - t0, time.process_time() - c0
        result.update(
            baseline_s=base_s,
            baseline_cpu_s=base_cpu,
            baseline_encode_calls=4 * sum(len(list(itertools.combinations(range(5), 2))) for _ in base),
            speedup=base_s / ours_s,
            speedup_cpu=base_cpu / ours_cpu,
            max_abs_diff_vs_baseline=max(abs(ours_map[q] - base[q]) for q in base),
        )
    return result


def bench_throughput(concurrencies: list[int], latency: float, per_slot: int) -> list[dict[str, Any]]:
    from curate.replay.server import OpenAIServer

    df = pl.read_csv(ROT_CSV)
    prompts = list({json.dumps(m): m for m in (answer_messages(p) for p in df["paraphrased"])}.values())
    prompts += [rot_messages(p, a) for p, a in df.select("paraphrased", "model_output").iter_rows()]
    rows = []
    with OpenAIServer() as server:
        server.set_latency(latency)
        for c in concurrencies:
            n = min(len(prompts), per_slot * c)
            client = LLMClient(LLMConfig(base_url=server.base_url, cache_dir=None, concurrency=c, timeout=30))
            server.reset_counts()
            t0 = time.perf_counter()
            client.complete_many(prompts[:n])
            elapsed = time.perf_counter() - t0
            assert server.calls == n and client.usage.completed == n
            ideal = c / latency
            rows.append({"concurrency": c, "requests": n, "seconds": elapsed, "requests_per_s": n / elapsed,
                         "ideal_requests_per_s": ideal, "efficiency": n / elapsed / ideal})
            client.close()
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_throughput_process(concurrencies: list[int], latency: float, per_slot: int) -> list[dict[str, Any]]:
    """As `bench_throughput`, with the replay server in its own process (`python -m curate.replay`), so client
    and server do not share one interpreter; CPU time per request of each side shows whether the machine's
    cores, not the client, are the limit."""
    import socket
    import subprocess

    import psutil  # installed with accelerate: CPU time of the server process

    df = pl.read_csv(ROT_CSV)
    prompts = list({json.dumps(m): m for m in (answer_messages(p) for p in df["paraphrased"])}.values())
    prompts += [rot_messages(p, a) for p, a in df.select("paraphrased", "model_output").iter_rows()]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "curate.replay", "--port", str(port), "--latency", str(latency),
                             "--data-dir", str(DATA.parents[1])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = proc.stderr.read().decode() if proc.stderr else ""
                    raise SystemExit(f"replay server did not start: {why}") from None
                time.sleep(0.1)
        server = psutil.Process(proc.pid)
        rows = []
        for c in concurrencies:
            n = min(len(prompts), per_slot * c)
            client = LLMClient(LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", cache_dir=None, concurrency=c,
                                         timeout=30))
            client.complete_many(prompts[: min(n, 2 * c)])  # warm the connection pool
            s0, c0, t0 = sum(server.cpu_times()[:2]), time.process_time(), time.perf_counter()
            client.complete_many(prompts[:n])
            elapsed = time.perf_counter() - t0
            client_cpu, server_cpu = time.process_time() - c0, sum(server.cpu_times()[:2]) - s0
            ideal = c / latency
            rows.append({"latency_s": latency, "concurrency": c, "requests": n, "seconds": elapsed,
                         "requests_per_s": n / elapsed, "ideal_requests_per_s": ideal,
                         "efficiency": n / elapsed / ideal, "client_cpu_ms_per_request": 1000 * client_cpu / n,
                         "server_cpu_ms_per_request": 1000 * server_cpu / n,
                         "cpu_bound_requests_per_s": n / max(client_cpu + server_cpu, 1e-9) * (os.cpu_count() or 1)})
            client.close()
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-baseline", action="store_true", help="skip the slow per-pair baseline")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--latency", type=float, default=0.05, help="server latency per request (s)")
    parser.add_argument("--per-slot", type=int, default=40, help="requests per concurrency slot")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "sage_bench.json")
    parser.add_argument("--skip-scoring", action="store_true", help="only the collection throughput")
    parser.add_argument("--process-latencies", type=float, nargs="+", default=[0.05, 0.2],
                        help="latencies (s) of the server-in-its-own-process runs")
    args = parser.parse_args()
    if not ROT_CSV.is_file():
        raise SystemExit(f"real SaGE data not found at {ROT_CSV}")

    import torch

    console = Console()
    scoring: dict[str, Any] = {}
    if not args.skip_scoring:
        console.print("[bold]SaGE scoring[/] (100 q100 questions, MiniLM)")
        scoring = bench_scoring(args.skip_baseline)
        table = Table("metric", "value")
        for key, value in scoring.items():
            table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
        console.print(table)

    console.print(f"[bold]Collection throughput[/] (replay server, {args.latency * 1000:.0f} ms latency)")
    throughput = bench_throughput(args.concurrency, args.latency, args.per_slot)
    table = Table("concurrency", "requests", "seconds", "req/s", "ideal req/s", "efficiency")
    for r in throughput:
        table.add_row(str(r["concurrency"]), str(r["requests"]), f"{r['seconds']:.2f}",
                      f"{r['requests_per_s']:.1f}", f"{r['ideal_requests_per_s']:.0f}", f"{r['efficiency']:.0%}")
    console.print(table)

    process_rows: list[dict[str, Any]] = []
    for latency in args.process_latencies:
        process_rows += bench_throughput_process(args.concurrency, latency, args.per_slot)
    table = Table("latency", "concurrency", "req/s", "ideal", "efficiency", "client CPU ms/req", "server CPU ms/req",
                  "CPU-bound req/s", title="server in its own process")
    for r in process_rows:
        table.add_row(f"{r['latency_s'] * 1000:.0f} ms", str(r["concurrency"]), f"{r['requests_per_s']:.1f}",
                      f"{r['ideal_requests_per_s']:.0f}", f"{r['efficiency']:.0%}",
                      f"{r['client_cpu_ms_per_request']:.2f}", f"{r['server_cpu_ms_per_request']:.2f}",
                      f"{r['cpu_bound_requests_per_s']:.0f}")
    console.print(table)

    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
        "scoring": scoring,
        "throughput": throughput,
        "throughput_server_process": process_rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
