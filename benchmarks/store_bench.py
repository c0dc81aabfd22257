"""Store benchmark: build DFAR and ETHICS, then the same group-by through DuckDB views vs polars.

Run: ``python benchmarks/store_bench.py`` (reads ../shared/data). Prints a table, writes
benchmarks/results/store_bench.json. ``--scale 1000000,10000000`` adds scale rows: a DFAR-layout source
of that many rows (real DFAR rows with numbered statements, 90 % train / 10 % test, 1 % of test
repeated in train) is generated in a temp dir and built by `curate build dfar` in a child process;
input rows/s and the child's peak RSS are reported (goal: >= 150k rows/s, <= 1.5 GB at 10 M rows).
Scale rows from an earlier run are kept in the JSON when a run adds none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, SHARED_DATA, emit, timeit  # noqa: E402
from builders.dfar import build_dfar  # noqa: E402
from builders.ethics import build_ethics  # noqa: E402
from curate.sql_views import connect  # noqa: E402
from curate.store import DatasetStore  # noqa: E402

QUERIES = {
    # (config, group-by SQL over its view, equivalent polars over the same parquet files)
    "dfar": (
        "default",
        "SELECT split, label, count(*) AS n, avg(length(reason)) AS reason_len FROM dfar GROUP BY ALL",
        lambda lf: lf.group_by("split", "label").agg(pl.len().alias("n"),
                                                     pl.col("reason").str.len_chars().mean().alias("reason_len")),
    ),
    "ethics": (
        "text_label",
        "SELECT subset, split, label, count(*) AS n, avg(length(text)) AS text_len FROM ethics GROUP BY ALL",
        lambda lf: lf.group_by("subset", "split", "label").agg(
            pl.len().alias("n"), pl.col("text").str.len_chars().mean().alias("text_len")),
    ),
}


GOAL_ROWS_PER_S = 150_000
GOAL_PEAK_RSS_MB = 1536
CHILD = """
import json, logging, resource, sys, time
t0 = time.perf_counter()
def usage():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "peak_rss_mb": round(ru.ru_maxrss / 1024)}
class Mark(logging.Handler):  # the builder logs once the last parquet byte is written, before the commit
    def emit(self, record):
        if record.getMessage().startswith("dfar: streamed"):
            u = usage()
            print(json.dumps({"stream_s": round(time.perf_counter() - t0, 1), "stream_cpu_s": u["cpu_s"],
                              "stream_peak_rss_mb": u["peak_rss_mb"]}), flush=True)
logging.getLogger("builders.dfar").addHandler(Mark())
logging.getLogger("builders.dfar").setLevel(logging.DEBUG)
import threading
import pyarrow.parquet as pq
import builders.base, curate.sources, curate.store
from builders.dfar import build_dfar
from curate.store import DatasetStore
phases, lock = {}, threading.Lock()
def timed(name, fn):  # CPU seconds of the calling thread, summed over threads: where the build's CPU goes
    def wrapper(*a, **k):
        c = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            with lock:
                phases[name] = phases.get(name, 0.0) + time.thread_time() - c
    return wrapper
pq.ParquetWriter.write_table = timed("parquet_encode_zstd", pq.ParquetWriter.write_table)
curate.store.ArrowDigester.update = timed("content_digest", curate.store.ArrowDigester.update)
builders.base.sha256_file = timed("output_file_sha256", builders.base.sha256_file)
curate.sources.SourceFile.from_path = classmethod(timed("source_sha256", curate.sources.SourceFile.from_path.__func__))
curate.store.DatasetStore._commit = timed("commit", curate.store.DatasetStore._commit)
import builders.dfar as dfar
def reading(*a, **k):  # DuckDB's work shows here only as far as the main thread does it
    it = read_batches(*a, **k)
    while True:
        c = time.thread_time()
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            with lock:
                phases["duckdb_read_main_thread"] = phases.get("duckdb_read_main_thread", 0.0) + time.thread_time() - c
        yield batch
read_batches, dfar._read_batches = dfar._read_batches, reading
r = build_dfar(DatasetStore(sys.argv[2]), sys.argv[1])
print(json.dumps({"total_s": round(time.perf_counter() - t0, 1), "summary": r.summary(), "notes": r.notes[:3],
                  "train_rows": r.version.manifest["configs"]["default"]["train"]["num_rows"],
                  "phase_cpu_s": {k: round(v, 1) for k, v in sorted(phases.items())}} | usage()), flush=True)
"""


def machine_info() -> dict[str, Any]:
    """What the figures depend on: cores, CPU model, memory, library versions, load while measuring."""
    import duckdb
    import pyarrow

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "memory_gb": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "pyarrow": pyarrow.__version__, "polars": pl.__version__,
            "duckdb": duckdb.__version__, "platform": platform.platform()}


def generate_dfar(folder: Path, n: int, chunk: int = 500_000) -> None:
    """n rows in DFAR's layout from the real rows, statements numbered so they are distinct; every 100th
    test statement is also a train statement (the overlap the default build drops)."""
    real = pl.read_csv(SHARED_DATA / "dfar" / "DFAR_trainset.csv", infer_schema=False).with_row_index("k")
    real = real.with_columns(pl.col("k").cast(pl.Int64))
    n_train = n * 9 // 10
    folder.mkdir(parents=True, exist_ok=True)
    for name, total, tag in (("DFAR_trainset.csv", n_train, "tr"), ("DFAR_testset.csv", n - n_train, "te")):
        with open(folder / name, "wb") as fh:
            for start in range(0, total, chunk):
                i = pl.DataFrame({"i": pl.int_range(start, min(total, start + chunk), eager=True)})
                df = i.with_columns((pl.col("i") % real.height).alias("k")).join(real, on="k", maintain_order="left")
                own = pl.col("Statement") + f" [{tag} " + pl.col("i").cast(pl.String) + "]"
                if tag == "te":  # test row i (every 100th) repeats train row i's statement
                    own = pl.when(pl.col("i") % 100 == 0).then(pl.col("Statement") + " [tr " + pl.col("i")
                                                                .cast(pl.String) + "]").otherwise(own)
                df.select(own.alias("Statement"), "Label", "Reason").write_csv(fh, include_header=start == 0)


def run_child(source: Path, store: Path, max_rss_mb: int) -> dict[str, Any]:
    """Build in a child process, which reports its own peak RSS; a watchdog stops it past `max_rss_mb`."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(store)], cwd=Path(__file__).parents[1],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()

    def watch() -> None:
        while proc.poll() is None:
            try:
                rss_kb = next(int(x.split()[1]) for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                              if x.startswith("VmRSS"))
            except (OSError, StopIteration):
                return
            if rss_kb / 1024 > max_rss_mb:
                killed.set()
                proc.kill()
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    out, err = proc.communicate()
    res: dict[str, Any] = {"wall_s": round(time.perf_counter() - t, 1)}
    for line in out.splitlines():  # the child's own ru_maxrss is its peak: exact, not mixed with other children
        if line.startswith("{"):
            res |= json.loads(line)
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        res["error"] = f"killed past the {max_rss_mb} MB RSS guard" if killed.is_set() else last
        res["peak_rss_mb"] = f"> {max_rss_mb}" if killed.is_set() else None
    return res


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def scale(sizes: list[int], max_rss_mb: int) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
            src = Path(tmp) / "src"
            t = time.perf_counter()
            generate_dfar(src, n)
            gen_s = time.perf_counter() - t
            input_mb = sum(p.stat().st_size for p in src.iterdir()) / 2**20
            load_before = os.getloadavg()
            res = run_child(src, Path(tmp) / "store", max_rss_mb)
            res["output_mb"] = round(sum(p.stat().st_size for p in (Path(tmp) / "store").rglob("*.parquet")) / 2**20)
            row = {"rows": n, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": _git_commit(),
                   "input_mb": round(input_mb), "generate_s": round(gen_s, 1),
                   "load_avg_before": [round(x, 2) for x in load_before],
                   "load_avg_after": [round(x, 2) for x in os.getloadavg()]} | res
            row["rows_per_s"] = round(n / res["total_s"]) if "total_s" in res else None
            if "stream_s" in res:
                row["stream_rows_per_s"] = round(n / res["stream_s"])
                row["stream_rows_per_cpu_s"] = round(n / res["stream_cpu_s"])
            out.append(row)
            print(json.dumps(row, default=str), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="", help="comma-separated DFAR sizes for scale rows, e.g. 1000000,10000000 "
                                                "(default: none, a quick run)")
    ap.add_argument("--max-rss-mb", type=int, default=6000,
                    help="stop a scale build past this RSS (protects a shared machine; default 6000)")
    args = ap.parse_args()
    scale_rows = scale([int(x) for x in args.scale.split(",") if x.strip()], args.max_rss_mb)
    previous = RESULTS / "store_bench.json"
    if previous.exists():  # keep earlier scale rows of other sizes (the 10 M run is too costly to repeat)
        sizes = {r["rows"] for r in scale_rows}
        old = [r for r in json.loads(previous.read_text()).get("scale", []) if r["rows"] not in sizes]
        scale_rows = sorted(old + scale_rows, key=lambda r: r["rows"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(tmp)
        t = time.perf_counter()
        dfar = build_dfar(store, SHARED_DATA / "dfar").version
        build_dfar_s = time.perf_counter() - t
        t = time.perf_counter()
        ethics = build_ethics(store, SHARED_DATA / "ethics").version
        build_ethics_s = time.perf_counter() - t
        builds = {"dfar": (dfar, build_dfar_s), "ethics": (ethics, build_ethics_s)}
        for key, (config, sql, polars_q) in QUERIES.items():
            version, build_s = builds[key]
            n_rows = version.num_rows(config)

            def duck(sql: str = sql) -> pl.DataFrame:
                con = connect(store)  # includes view registration, as a CLI call would
                try:
                    return con.sql(sql).pl()
                finally:
                    con.close()

            files = [str(p) for p in version.files(config)]

            def polars_direct(files: list[str] = files, q=polars_q) -> pl.DataFrame:
                return q(pl.scan_parquet(files)).collect()

            con = connect(store)
            warm_s, _ = timeit(lambda con=con, sql=sql: con.sql(sql).pl())
            con.close()
            duck_s, d = timeit(duck)
            pol_s, p = timeit(polars_direct)
            assert d.height == p.height, (d, p)
            rows.append([key, n_rows, round(build_s, 3), round(n_rows / build_s), round(duck_s * 1e3, 2),
                         round(warm_s * 1e3, 2), round(pol_s * 1e3, 2), round(duck_s / pol_s, 2),
                         round(warm_s / pol_s, 2), round(n_rows / warm_s), round(n_rows / pol_s)])
    emit(
        "store_bench",
        "Store: build time and group-by query (median of 5)",
        ["dataset", "rows", "build s", "build rows/s", "duckdb cold ms", "duckdb warm ms", "polars ms",
         "cold/polars", "warm/polars", "duckdb warm rows/s", "polars rows/s"],
        rows,
        {"note": "cold = connect + register every store view + query, as each CLI call does; "
                 "warm = the query alone on an open connection",
         "machine_info": machine_info(), "scale": scale_rows,
         "scale_goal": {"rows_per_s": GOAL_ROWS_PER_S, "peak_rss_mb": GOAL_PEAK_RSS_MB, "at_rows": 10_000_000},
         "scale_note": "rows_per_s = input rows / wall time of `build_dfar` in a child process (imports, "
                       "streaming, the store's content hash and commit); stream_* = up to the last parquet byte, "
                       "before the commit; peak_rss_mb = the child's ru_maxrss; cpu_s = its user + system time. "
                       "phase_cpu_s = thread CPU inside parquet encoding (+zstd), the content digest of the rows "
                       "written, the sha256 of output and source files, the commit, and the main thread's share "
                       "of DuckDB's reading; the rest of cpu_s is DuckDB's own threads, numpy checks and imports. "
                       "The machine is shared: see load_avg_before/after."},
    )
    if scale_rows:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="DFAR build at scale (child process; goal >= 150k rows/s, <= 1.5 GB peak at 10 M)")
        for c in ("rows", "input MB", "build s", "rows/s", "peak RSS MB", "stream s", "stream rows/s",
                  "stream rows/CPU-s", "stream peak RSS MB", "load before", "goal"):
            table.add_column(c)
        for r in scale_rows:
            rss = r.get("peak_rss_mb")
            fast = (r.get("rows_per_s") or 0) >= GOAL_ROWS_PER_S
            ok = fast and isinstance(rss, int | float) and rss <= GOAL_PEAK_RSS_MB
            table.add_row(f"{r['rows']:,}", str(r["input_mb"]), str(r.get("total_s", "-")),
                          f"{r['rows_per_s']:,}" if r.get("rows_per_s") else "-", str(rss),
                          str(r.get("stream_s", "-")), f"{r.get('stream_rows_per_s', 0):,}",
                          f"{r.get('stream_rows_per_cpu_s', 0):,}", str(r.get("stream_peak_rss_mb", "-")),
                          str(r["load_avg_before"][0]), "met" if ok else r.get("error", "missed"))
        Console(width=200).print(table)


if __name__ == "__main__":
    main()
