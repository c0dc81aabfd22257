"""Small helpers shared by the benchmark scripts: timing, result tables and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CURATE_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time over `repeat` runs after `warmup` runs, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}


def emit(name: str, title: str, columns: list[str], rows: list[list[Any]], extra: dict[str, Any]) -> Path:
    """Print a rich table and write `benchmarks/results/<name>.json`."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(f"{x:,.4g}" if isinstance(x, float) else str(x) for x in r))
    Console(width=200).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), "columns": columns, "rows": rows, **extra}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    Console().print(f"wrote {path}")
    return path


class Laps:
    """Named wall-clock laps of a long benchmark, printed as each one ends (`laps("train", t0)`)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, t0: float) -> None:
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - self.start:7.0f} s] {name}: {self.seconds[name]} s", flush=True)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)
