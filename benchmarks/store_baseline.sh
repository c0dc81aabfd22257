#!/usr/bin/env bash
# The old builder (8afa6a8: rows held as Python dicts) against this checkout's streaming builder on the same
# generated 1 M-row DFAR-layout source, interleaved, one process each, wall time and peak RSS from /usr/bin/time.
# Figures go in benchmarks/results/store_bench_baseline.json (by hand: this prints them).
#   bash benchmarks/store_baseline.sh [ROWS] [OLD_COMMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-1000000}" old="${2:-8afa6a8}" here="$PWD" py="$PWD/.venv/bin/python"
work="$(mktemp -d)"
trap 'git worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add -q "$work/old" "$old"
"$py" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path
from benchmarks.store_bench import generate_dfar; generate_dfar(Path('$work/src'), $rows)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in 1 2; do
    for code in old new; do
        dir="$here"; [ "$code" = old ] && dir="$work/old"
        rm -rf "$work/store"
        (cd "$dir" && /usr/bin/time -f "$code round $round: wall %e s, peak %M KB" env PYTHONPATH="$dir" \
            OMP_NUM_THREADS=1 "$py" -c "from curate.cli import app; app()" build dfar --source "$work/src" \
            --store "$work/store" >/dev/null 2>"$work/err") || { cat "$work/err"; exit 1; }
        tail -1 "$work/err"
    done
done
