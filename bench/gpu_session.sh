#!/usr/bin/env bash
# Every GPU figure of reft-fast in device-tool calls (10 minutes each at most). Build the wheels here first
# (`bash bench/make_wheels.sh`), then, from a session that has a GPU machine:
#
#   call 1:  run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#            setup, kernel benchmark (first: its figures are the call's main result, and it builds the cuda
#            backend), GPU tests (triton, the cuda backend built with nvcc, compute-sanitizer)
#   call 2:  run(command="bash bench/gpu_session.sh setup e2e", carry=[".whl"], timeout_s=600)
#            the end-to-end rows without gradient checkpointing
#   call 3:  run(command="bash bench/gpu_session.sh setup e2e-ckpt", carry=[".whl"], timeout_s=600)
#            the end-to-end rows with gradient checkpointing
#
# Stages (arguments, in order; default: setup kernels tests): setup, tests, kernels, e2e, e2e-ckpt. Each stage has
# a time limit inside the call's budget (BUDGET_S, default 570 s); bench_e2e.py starts no row past its deadline and
# rewrites its CSV after every row, so a call cut short still returns what it measured. Extra bench_e2e.py arguments
# go in E2E_ARGS (e.g. E2E_ARGS="--shape 13b" on an H200). Everything lands in $OUT (the device tool returns it):
# session.log, kernels/*.csv|png, e2e-ckpt-off/ and e2e-ckpt-on/ *.csv|png. At most 8 files come back from one call,
# and one call is 10 minutes: hence three calls.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
OUT=${OUT:-bench/results/gpu_session}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}  # the GPU image's python3 holds torch

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
limit() { local want=$1 room; room=$(($(left) - 15)); echo $((want < room ? want : room)); }
banner() { echo; echo "=== $1 ($(left) s left) ==="; }

stage_setup() {
  banner setup
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  if [ -d .whl ]; then
    # The packages the image lacks (bench/make_wheels.sh); --no-deps: each needed one is in .whl or on the image.
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "setup: installing .whl failed"
  else
    echo "setup: no .whl folder carried: pyreft, deepspeed and liger-kernel rows/tests will be skipped"
  fi
  # reft-fast itself, editable (kernels/ is the package reft_fast.kernels through pyproject's package-dir).
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "setup: installing reft-fast failed"
  $PY - <<'EOF'
import importlib, importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for dist in ("triton", "transformers", "liger-kernel", "pyreft", "pyvene", "peft", "deepspeed", "datasets"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} missing")
for module in ("reft_fast", "reft_fast.kernels.low_rank_edit", "liger_kernel.transformers", "pyreft", "deepspeed"):
    try:
        importlib.import_module(module)
        print(f"import {module}: ok")
    except Exception as error:
        print(f"import {module}: {type(error).__name__}: {error}")
EOF
}

stage_tests() {
  banner tests
  # Tests marked cuda (skipped on CPU machines), then the kernel and op tests on the GPU itself (no interpreter).
  timeout "$(limit 150)" $PY -m pytest -q -m cuda -p no:cacheprovider tests || echo "tests (cuda): exit $?"
  local files=()
  for f in tests/test_kernels.py tests/test_ops.py tests/test_triton_compile.py; do [ -f "$f" ] && files+=("$f"); done
  if [ ${#files[@]} -gt 0 ]; then
    timeout "$(limit 150)" $PY -m pytest -q -p no:cacheprovider "${files[@]}" || echo "tests (kernels): exit $?"
  fi
  # The cuda backend (csrc/): built with nvcc on first use (about a minute), then its tests on the device, including the
  # compute-sanitizer run. Its tests are not marked cuda (on CPU machines they run through csrc/sim).
  if [ -f tests/test_cuda_backend.py ]; then
    timeout "$(limit 300)" $PY -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py || echo "tests (cuda backend): exit $?"
  fi
}

stage_kernels() {
  banner kernels
  if [ -f bench/bench_kernels.py ]; then
    timeout "$(limit 240)" $PY bench/bench_kernels.py --out "$OUT/kernels" || echo "bench_kernels: exit $?"
  else
    echo "bench/bench_kernels.py not present: skipped"
  fi
}

run_e2e() {  # $1: on|off (gradient checkpointing); each in its own folder (the CSV is named by device and date)
  local deadline=$(($(left) - 75))  # room for the last row started (a 7B step, its warm-up and the extras)
  if [ "$deadline" -le 0 ]; then echo "e2e (checkpointing $1): no time left"; return; fi
  # shellcheck disable=SC2086  # E2E_ARGS is a list of arguments
  timeout "$(limit $((deadline + 60)))" $PY bench/bench_e2e.py --checkpointing "$1" --deadline-s "$deadline" \
    --out "$OUT/e2e-ckpt-$1" ${E2E_ARGS:-} || echo "bench_e2e (checkpointing $1): exit $?"
}

stage_e2e() { banner "e2e, no checkpointing"; run_e2e off; }
stage_e2e-ckpt() { banner "e2e, checkpointing"; run_e2e on; }

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(setup kernels tests)
for stage in "${STAGES[@]}"; do
  case "$stage" in
    setup|tests|kernels|e2e|e2e-ckpt) "stage_$stage" ;;
    *) echo "unknown stage '$stage' (setup, tests, kernels, e2e, e2e-ckpt)"; exit 2 ;;
  esac
done
banner done
ls -lR "$OUT"
