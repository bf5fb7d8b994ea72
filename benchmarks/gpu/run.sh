#!/usr/bin/env bash
# The GPU check: on one CUDA machine with no network, in one command and at most ~8 minutes, it installs the
# project, runs the CUDA tests and measures the GPU claims, and writes one JSON summary to --out.
#
#   bash benchmarks/gpu/run.sh --out DIR [--wheels DIR] [--dry-run]
#
# Needs a Python with PyTorch >= 2.9 (CUDA), transformers, tokenizers, safetensors, matplotlib and pytest. torch is
# never installed or replaced. The rest (benchmarks/gpu/wheels.txt: hydra-core, omegaconf, antlr4 4.9.3, ...) is
# installed from a local folder of wheels, benchmarks/gpu/wheels by default: fill it on any machine with PyPI with
#   bash benchmarks/gpu/fetch_wheels.sh
# and bring it along with the repository (it is git-ignored).
#
# Steps (each logs to DIR/logs/<step>.log; a failed step is recorded and the next one still runs):
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
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'; usage: bash benchmarks/gpu/run.sh --out DIR [--wheels DIR] [--dry-run]" >&2
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

# step NAME TIMEOUT_S COMMAND...: runs it with its log, prints its last lines, records its exit code.
step() {
  local name="$1" limit="$2"; shift 2
  local began=$SECONDS
  echo "== $name: $*"
  if [ "$DRY_RUN" = 1 ] && [ "$name" = install ]; then
    echo "(dry run: not installing)" | tee "$OUT/logs/$name.log"
    return
  fi
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/logs/$name.log" | cut -c1-400
  echo "-- $name: exit $rc in $((SECONDS - began)) s"
  CODES="$CODES\"$name\": $rc, "
}

BENCH=()
if [ "$DRY_RUN" = 1 ]; then BENCH=(--dry-run); fi

step install 180 bash -c "set -e
  if [ ! -d '$WHEELS' ]; then echo 'no wheel folder $WHEELS: fill it with bash benchmarks/gpu/fetch_wheels.sh'; exit 3; fi
  '$PY' -m pip install --quiet --disable-pip-version-check --no-index --find-links '$WHEELS' -r benchmarks/gpu/wheels.txt
  '$PY' -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-build-isolation -e .
  '$PY' -c 'import torch, hydra, omegaconf; print(\"torch\", torch.__version__, \"untouched\")'"
step env 60 "$PY" benchmarks/gpu/env.py
if [ "$DRY_RUN" = 1 ]; then
  step tests 120 "$PY" -m pytest -m cuda -o addopts= -p no:cacheprovider -q --collect-only tests
else
  # addopts off: pytest-xdist (the suite's workers) is not needed here; the CUDA tests share one GPU.
  step tests 240 "$PY" -m pytest -m cuda -o addopts= -p no:cacheprovider -q -rfE --junitxml="$OUT/pytest-cuda.xml" tests
fi
step polyglu_mfu 200 "$PY" benchmarks/gpu/polyglu_mfu.py "${BENCH[@]}"
step moe_layer 90 "$PY" benchmarks/gpu/moe_layer.py "${BENCH[@]}"
step trainer_overhead 150 "$PY" benchmarks/gpu/trainer_overhead.py "${BENCH[@]}"

echo "${CODES%, }}" >"$OUT/exit_codes.json"
SUMMARY=(--out "$OUT" --wall-s "$((SECONDS - START))")
if [ "$DRY_RUN" = 1 ]; then SUMMARY+=(--dry-run); fi
echo "== summary ($((SECONDS - START)) s): $OUT/gpu_check.json"
"$PY" benchmarks/gpu/summarize.py "${SUMMARY[@]}"
