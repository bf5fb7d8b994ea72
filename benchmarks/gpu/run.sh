#!/usr/bin/env bash
# The GPU check: on one CUDA machine with no network, in one command and at most ~8 minutes, it installs the
# project, runs the CUDA tests and measures the GPU claims, and writes one JSON summary to --out.
#
#   bash benchmarks/gpu/run.sh --out DIR [--wheels DIR] [--budget-s 480] [--dry-run]
#
# Needs a Python with PyTorch >= 2.9 (CUDA), transformers, tokenizers, safetensors, matplotlib and pytest. torch is
# never installed or replaced. The rest (benchmarks/gpu/wheels.txt: hydra-core, omegaconf, antlr4 4.9.3, ...) is
# installed from a local folder of wheels, benchmarks/gpu/wheels by default: fill it on any machine with PyPI with
#   bash benchmarks/gpu/fetch_wheels.sh
# and bring it along with the repository (it is git-ignored).
#
# Steps (each logs to DIR/logs/<step>.log; a failed step is recorded and the next one still runs). Each has its own
# time limit, cut to what is left of --budget-s (480 s by default, all steps together); a step that would start
# with under 20 s left is skipped and recorded as such, so the whole check ends in time:
#   1. install   pip install --no-index from the wheel folder, then the project itself with --no-deps
#   2. env       device, torch/CUDA versions, which fast kernels exist          (benchmarks/gpu/env.py)
#   3. tests     pytest -m cuda: varlen vs masked SDPA, grouped_mm vs loop, a bf16 step per family through
#                trainer/run.py, exact resume in fp32                            (tests/test_cuda.py, ...)
#   4. polyglu_mfu       polyglu-600M, seq 4096, bf16, +-checkpointing: tokens/s and MFU >= 0.40
#   5. moe_layer         MoE layer, GPT-2 small sizes, 8k tokens: time vs dense <= 1.10 (top-1), <= 2.10 (top-2)
#   6. trainer_overhead  the trainer's loop vs a bare loop on GPU: ratio >= 0.95
#   7. summary   DIR/gpu_check.json, also printed as the last line               (benchmarks/gpu/summarize.py)
#
# --dry-run (any machine, no GPU needed; the normal test suite runs it): installs nothing, collects the CUDA tests
# without running them, and has every benchmark say what it would measure; the summary marks itself dry_run.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT=""
WHEELS="$ROOT/benchmarks/gpu/wheels"
DRY_RUN=0
BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#*=}"; shift ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --budget-s=*) BUDGET="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'; usage: bash benchmarks/gpu/run.sh --out DIR [--wheels DIR] [--budget-s S] [--dry-run]" >&2
       exit 2 ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "error: --out DIR is required (where the logs and gpu_check.json go)" >&2
  exit 2
fi
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
cd "$ROOT"
# The repository on the path even if the editable install cannot be made; offline hubs fail fast, not after retries.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
START=$SECONDS
CODES="{"
echo "GPU check: budget ${BUDGET} s, logs in $OUT/logs"

# step NAME TIMEOUT_S COMMAND...: runs it with its log (limit cut to the budget left), prints its last lines,
# records its exit code (124: timed out; "skipped": no budget left).
step() {
  local name="$1" limit="$2"; shift 2
  local began=$SECONDS left=$((BUDGET - (SECONDS - START)))
  echo "== $name: $*"
  if [ "$DRY_RUN" = 1 ] && [ "$name" = install ]; then
    echo "(dry run: not installing)" | tee "$OUT/logs/$name.log"
    return
  fi
  if [ "$left" -lt 20 ]; then
    echo "-- $name: skipped, ${left} s left of the ${BUDGET} s budget" | tee "$OUT/logs/$name.log"
    CODES="$CODES\"$name\": \"skipped\", "
    return
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/logs/$name.log" | cut -c1-400
  echo "-- $name: exit $rc in $((SECONDS - began)) s (limit $limit s)"
  CODES="$CODES\"$name\": $rc, "
}

BENCH=()
if [ "$DRY_RUN" = 1 ]; then BENCH=(--dry-run); fi

step install 180 bash -c "set -e
  if [ ! -d '$WHEELS' ]; then echo 'no wheel folder $WHEELS: fill it with bash benchmarks/gpu/fetch_wheels.sh'; exit 3; fi
  '$PY' -m pip install --quiet --disable-pip-version-check --no-index --no-deps --find-links '$WHEELS' -r benchmarks/gpu/wheels.txt
  '$PY' -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-build-isolation -e .
  '$PY' -c 'import torch, hydra, omegaconf; print(\"torch\", torch.__version__, \"untouched\")'"
step env 60 "$PY" benchmarks/gpu/env.py
# The CUDA tests' own files: collecting all of tests/ would import modules that need what a GPU image lacks
# (lm-eval, datasets, deepspeed) and stop pytest before any test ran. addopts off: pytest-xdist's workers are
# not installed there, and the tests share one GPU.
CUDA_TESTS=(tests/test_cuda.py tests/test_moe_grouped_mm.py)
if [ "$DRY_RUN" = 1 ]; then
  step tests 120 "$PY" -m pytest -m cuda -o addopts= -p no:cacheprovider -q --collect-only "${CUDA_TESTS[@]}"
else
  step tests 240 "$PY" -m pytest -m cuda -o addopts= -p no:cacheprovider -q -rfE --junitxml="$OUT/pytest-cuda.xml" \
    "${CUDA_TESTS[@]}"
fi
step polyglu_mfu 150 "$PY" benchmarks/gpu/polyglu_mfu.py "${BENCH[@]}"
step moe_layer 60 "$PY" benchmarks/gpu/moe_layer.py "${BENCH[@]}"
step trainer_overhead 120 "$PY" benchmarks/gpu/trainer_overhead.py "${BENCH[@]}"

echo "${CODES%, }}" >"$OUT/exit_codes.json"
SUMMARY=(--out "$OUT" --wall-s "$((SECONDS - START))")
if [ "$DRY_RUN" = 1 ]; then SUMMARY+=(--dry-run); fi
echo "== summary ($((SECONDS - START)) s): $OUT/gpu_check.json"
"$PY" benchmarks/gpu/summarize.py "${SUMMARY[@]}"
