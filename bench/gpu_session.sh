#!/usr/bin/env bash
# Every GPU figure of reft-fast in ONE device-tool command of at most 9.5 minutes. Build the wheels here first
# (`bash bench/make_wheels.sh`, into the git-ignored .whl/), then, from a session that has a GPU machine:
#
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Stages, in the order of what is still unmeasured (the e2e and kernel tables were taken once, on an H200 on
# 2026-11-28), each with its own share of the budget (BUDGET_S, default 570 s), so that a slow stage cannot starve
# the next ones. Every result is written under $OUT as soon as it exists, so a command cut short still returns what
# it measured:
#   1. setup    (≤ 60 s) the carried wheels into /tmp/site, reft-fast importable, every import checked
#   2. host     the ReFT step's host cost against the frozen floor, plain hook and pyreft (bench_host.py --device
#               cuda: a tiny 32-layer Llama whose kernels take microseconds, reft-fast:triton timed with Triton's
#               launcher; the whole step captured, and training.cuda_graphs' replayed forward and backward), its
#               table in session.log
#   3. packing  packed against padded batches (bench_packing.py: Llama-3.2-1B's shape, bf16, rows of 1024), one
#               round per mode, its result lines in session.log; then the cuda backend's nvcc build starts in the
#               background
#   4. correctness  the tests that prove what is timed is right (training.cuda_graphs' replays against eager steps,
#               the triton op against float64, the triton kernels, liger's fused base against the plain one), then
#               the other cuda-marked ones (flex_attention packing)
#   5. e2e      end-to-end training steps (bench_e2e.py --plan session): configuration (b) with the fused base
#               (floor, reft-fast, pyreft, hook), its plain floor, then (b) on the plain base through
#               training.cuda_graphs' replayed forward and backward (floor-replayed, reft-fast:triton-replayed) and
#               its eager reft-fast:triton, then (a), then gradient checkpointing, the cuda backend last; one process
#               per row, forked from a server that imported the libraries once
#   6. kernels  the reduced kernel grid (bench_kernels.py --grid session: N ∈ {112, 4096, 65536}, d 4096, r ∈ {8, 32},
#               torch and triton), its CSV written row by row
#   7. tests    the mixed-batch kernel, the cuda backend's tests, compute-sanitizer last
# $OUT then holds at most 7 files, all at its top: session.log (this script's whole output, the cuda build's log
# appended at the end), host_*.csv, e2e_*.csv|png, kernels_*.csv|png, tests.log (the device tool
# returns 8 files at most, no more than 2 folders down).
#
#   bash bench/gpu_session.sh --dry-run   # the same stages, processes, budgets and files on the CPU, smoke sizes,
#                                         # about 2 minutes (tests/test_bench_session.py runs it); the wheels are
#                                         # installed for CPython 3.12 into a scratch folder, the tests only collected
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_session.sh [--dry-run]"; exit 2 ;;
esac
if [ "$DRY_RUN" = 1 ]; then
  # A cap, not a duration (about 100 s alone): the tests run it beside a second xdist worker, under which the e2e
  # stage's share of 135 s (28 s) cut its smoke rows short (2026-11-29), and later the packing stage's 13 s of 180.
  BUDGET_S=${BUDGET_S:-210}
  OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_session_dry.XXXXXX")}
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session_site.XXXXXX")
  PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  SMOKE=(--smoke)
else
  BUDGET_S=${BUDGET_S:-570}
  OUT=${OUT:-bench/results/gpu_session}
  SCRATCH=/tmp
  PY=${PY:-python3}  # the GPU image's python3 holds torch
  SMOKE=()
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/session.log") 2>&1
TEE_PID=$!
# Offline machine: nothing may try the Hub. NVML answers torch.cuda.is_available() without initializing CUDA (a
# process forked from one that initialized it cannot use CUDA: bench_e2e.py forks its rows).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTORCH_NVML_BASED_CUDA_CHECK=1
export MPLBACKEND=Agg

# Each stage's reserve: what it may use at most, and what the stages after it keep for themselves.
# Since the second H200 session of 2026-11-30: issues 15 and 17 (host, packing) are what is still open; the e2e and
# kernel tables were taken twice, so they keep less.
SETUP_S=60 HOST_S=120 PACKING_S=100 CHECKS_S=150 E2E_MIN_S=60 KERNELS_S=35 TESTS_MIN_S=30
if [ "$DRY_RUN" = 1 ]; then SETUP_S=30 HOST_S=10 PACKING_S=40 CHECKS_S=25 E2E_MIN_S=30 KERNELS_S=25 TESTS_MIN_S=20; fi

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# limit WANT [KEEP]: at most WANT seconds, leaving KEEP (default 5) for what follows.
limit() { local room=$(($(left) - ${2:-5})); [ "$room" -lt 1 ] && room=1; echo $(($1 < room ? $1 : room)); }
banner() { echo; echo "=== $1 ($(left) s of ${BUDGET_S} s left) ==="; }
# run_limited SECONDS LABEL COMMAND...: the command and every process it starts are ended at the limit (timeout
# signals its whole process group: a forked row must not go on using the GPU under the next stage).
run_limited() {
  local seconds=$1 label=$2 rc; shift 2
  timeout -k 10 "$seconds" "$@"; rc=$?
  case $rc in
    0) ;;
    124|137) echo "$label: stopped at its limit of $seconds s (what it wrote so far is kept)" ;;
    *) echo "$label: exit $rc" ;;
  esac
  return 0
}

# The wheels the image lacks go to $SITE, first on PYTHONPATH; setuptools (only to install reft-fast) to $TOOLS.
SITE=$SCRATCH/site TOOLS=$SCRATCH/build-tools
WHEEL_TARGET=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
              --platform manylinux_2_24_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

install_wheels() {
  local wheels=() tools=() whl
  for whl in .whl/*.whl; do
    [ -e "$whl" ] || continue
    case "$(basename "$whl")" in setuptools-*) tools+=("$whl") ;; *) wheels+=("$whl") ;; esac
  done
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "setup: no wheels in .whl (carry=[\".whl\"] after bash bench/make_wheels.sh): pyreft, deepspeed and" \
         "liger-kernel rows and tests will be skipped or fail"
    return
  fi
  local pip=("$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir
             --upgrade)
  if [ "$DRY_RUN" = 1 ]; then
    # This machine's Python is not the GPU image's 3.12: install them for 3.12 into a scratch folder (every wheel
    # must be a cp312 or pure one, one version each), and keep this machine's own packages on the path.
    pip+=("${WHEEL_TARGET[@]}")
  fi
  "${pip[@]}" --target "$SITE" "${wheels[@]}" && echo "setup: ${#wheels[@]} wheels installed into $SITE" \
    || echo "setup: installing the wheels into $SITE FAILED (exit $?): the rows and tests that need them will fail"
  if [ ${#tools[@]} -gt 0 ]; then
    "${pip[@]}" --target "$TOOLS" "${tools[@]}" || echo "setup: installing ${tools[*]} FAILED (exit $?)"
  fi
  [ "$DRY_RUN" = 1 ] || export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
}

# reft-fast importable as reft_fast, with kernels/ as reft_fast.kernels and csrc/ as reft_fast.csrc (pyproject's
# package-dir): an editable install (its `license = "Apache-2.0"` needs setuptools ≥ 77: the carried one), else links.
install_reft_fast() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "setup: dry run: reft-fast is this checkout's own development install"
    return
  fi
  if PYTHONPATH=$TOOLS${PYTHONPATH:+:$PYTHONPATH} "$PY" -m pip install -q --disable-pip-version-check --no-index \
       --no-deps --no-build-isolation -e . ; then
    echo "setup: reft-fast installed (editable)"
    return
  fi
  # The copy of the tree on the device machine is thrown away afterwards: link the two folders into the package.
  echo "setup: the editable install of reft-fast FAILED (exit $?): linking kernels/ and csrc/ into reft_fast/ instead"
  ln -sfn ../kernels reft_fast/kernels && ln -sfn ../csrc reft_fast/csrc
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
}

check_imports() {
  local pythonpath=${PYTHONPATH:-}
  [ "$DRY_RUN" = 1 ] && pythonpath=  # the scratch folder holds 3.12 wheels, not importable by this Python
  PYTHONPATH=$pythonpath run_limited "$(limit 40)" "setup: import check" "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
import torch
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (cuda {torch.version.cuda}, GPU visible: {cuda})")
for dist in ("triton", "transformers", "peft", "liger-kernel", "pyreft", "pyvene", "deepspeed", "datasets",
             "pydantic", "typing-extensions", "reft-fast"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist} MISSING")
for module in ("reft_fast", "reft_fast.kernels.low_rank_edit", "reft_fast.ops.cuda_build", "liger_kernel.transformers",
               "peft", "pyreft", "deepspeed", "datasets"):
    try:
        before = torch.cuda.is_initialized()
        importlib.import_module(module)
        made = " (it created the CUDA context)" if torch.cuda.is_initialized() and not before else ""
        print(f"  import {module}: ok{made}")
    except Exception as error:
        print(f"  import {module}: FAILED: {type(error).__name__}: {str(error)[:300]}")
print(f"  reft_fast from {importlib.import_module('reft_fast').__file__}")
# The row processes are forked: nothing above may have initialized CUDA (with the NVML check it is not).
print(f"  CUDA context created by the imports: {torch.cuda.is_initialized()}")
EOF
}

stage_setup() {
  banner "setup"
  if [ "$DRY_RUN" = 1 ]; then
    echo "setup: dry run on $(uname -m), $($PY --version 2>&1): no GPU"
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "setup: nvidia-smi failed"
  fi
  install_wheels
  install_reft_fast
  check_imports
}

# The cuda backend's nvcc build took more than 170 s on the H200 machine (2026-11-28; 48 s with 8 jobs on
# 2026-11-30), longer than a stage can wait: it runs in the background once the host and packing stages, which time
# the CPU's part of a step, are done, on cores the GPU-bound stages leave idle. The e2e cuda row and the cuda backend
# tests load the same cached extension (torch's build lock makes a concurrent loader wait for it).
start_cuda_build() {
  ( MAX_JOBS=${MAX_JOBS:-8} timeout -k 10 "$(limit 400)" "$PY" -c '
import time
from reft_fast.ops import cuda_build as cuda_backend
start = time.time()
try:
    cuda_backend.load()
    print(f"cuda backend built in {time.time() - start:.0f} s")
except Exception as error:
    print(f"cuda backend build failed after {time.time() - start:.0f} s: {type(error).__name__}: {str(error)[:2000]}")
' >"$SCRATCH/cuda_build.log" 2>&1 & )
  echo "building the cuda backend in the background (its log is copied here at the end)"
}

stage_e2e() {
  banner "e2e"
  # Start no row once only the later stages' reserves and a typical row's time (a 7B step's build, warm-up, ten
  # steps and extras) are left; end the stage at the reserves, whatever runs then; no row longer than row_s.
  local hard=$(($(left) - KERNELS_S - TESTS_MIN_S - 10)) typical_row_s=45 row_s=150
  [ "$DRY_RUN" = 1 ] && typical_row_s=15 row_s=60
  if [ "$hard" -le 20 ]; then echo "e2e: no time left"; return; fi
  local deadline=$((hard - typical_row_s > 10 ? hard - typical_row_s : 10))
  run_limited "$hard" "bench_e2e" "$PY" bench/bench_e2e.py "${SMOKE[@]}" --plan session --out "$OUT" \
    --deadline-s "$deadline" --row-timeout-s "$row_s" ${E2E_ARGS:-}
}

stage_kernels() {
  banner "kernels"
  local hard
  hard=$(limit "$KERNELS_S" "$TESTS_MIN_S")
  run_limited "$hard" "bench_kernels" "$PY" bench/bench_kernels.py "${SMOKE[@]}" --grid session \
    --backends torch,triton --no-orthogonal --deadline-s $((hard * 2 / 3)) --out "$OUT"
}

# pytest_step LABEL WANT_S KEEP_S ARGS...: one pytest run of at most WANT_S seconds that leaves KEEP_S to the stages
# after it, its output appended to tests.log and summed up here.
pytest_step() {
  local label=$1 want=$2 keep=$3 seconds; shift 3
  seconds=$(limit "$want" "$keep")
  if [ "$seconds" -le 5 ]; then echo "tests ($label): no time left"; return; fi
  local collect=()
  [ "$DRY_RUN" = 1 ] && collect=(--collect-only)  # on the CPU: only that the selection names tests that exist
  echo "--- tests ($label): pytest $* (limit $seconds s)" >>"$OUT/tests.log"
  local first_line
  first_line=$(($(wc -l <"$OUT/tests.log") + 1))  # summarize this step's lines only (a killed step prints none)
  # addopts cleared: the suite's two xdist workers are for 2-core CPU machines (one GPU here; no xdist on the image)
  run_limited "$seconds" "tests ($label)" "$PY" -m pytest -q -o addopts= -p no:cacheprovider -rfEs "${collect[@]}" \
    "$@" >>"$OUT/tests.log" 2>&1
  local summary
  summary=$(tail -n "+$first_line" "$OUT/tests.log" \
    | grep -E '(passed|failed|error|skipped|tests? collected|no tests ran)' | tail -1)
  echo "tests ($label): ${summary:-no summary (stopped before pytest reported)}"
}

# The step's host cost on the GPU (issue 15): the table of bench_host.py with reft-fast:triton timed for real; its
# rows go to session.log and its CSV to $OUT. The dry run only checks that the script starts: its
# CPU table (the interpreter's Triton path counted and stubbed) is tests/test_bench_host.py's.
stage_host() {
  banner "host"
  local hard
  hard=$(limit "$HOST_S" $((PACKING_S + CHECKS_S + E2E_MIN_S + KERNELS_S + TESTS_MIN_S)))
  if [ "$DRY_RUN" = 1 ]; then
    run_limited "$hard" "bench_host" "$PY" bench/bench_host.py --help >/dev/null && echo "host: bench_host.py starts"
    return
  fi
  run_limited "$hard" "bench_host" "$PY" bench/bench_host.py --device cuda --reps 20 --warmup 3 \
    --out "$OUT"
}

# Packing against padding on the GPU (issue 17): Llama-3.2-1B's shape with random weights, bf16, rows of 1024, 32
# examples a step, one round per mode; its two result lines (every step's time among them) go to session.log, its CSV
# to the scratch folder.
stage_packing() {
  banner "packing"
  local hard
  hard=$(limit "$PACKING_S" $((CHECKS_S + E2E_MIN_S + KERNELS_S + TESTS_MIN_S)))
  if [ "$DRY_RUN" = 1 ]; then
    local args=(--tiny --max-length 64 --micro-batch 4 --steps 1 --threads 1)
  else
    # 32 examples a step (16 on 2026-11-30: 1.19x, both modes near a floor not proportional to their slots): about
    # 60 GiB at the padded peak
    local args=(--model llama-1b --device cuda --dtype bfloat16 --max-length 1024 --micro-batch 32 --warmup 2
                --steps 3)
  fi
  run_limited "$hard" "bench_packing" "$PY" bench/bench_packing.py "${args[@]}" --rounds 1 \
    --out "$SCRATCH/packing"
}

# What is timed is right: the triton op against the float64 reference, the triton kernels (poisoned outputs, a large
# bf16 case on the GPU), liger's fused base against the plain one; then the other cuda-marked tests (flex_attention's
# document mask for packing among them). Each step leaves the e2e, kernel and last test stages their minimum.
stage_correctness() {
  banner "correctness"
  local keep=$((E2E_MIN_S + KERNELS_S + TESTS_MIN_S))
  # training.cuda_graphs (issue 15): replays against eager steps over new batches, and a recipe run both ways
  pytest_step "captured steps" 150 "$keep" -m cuda tests/test_graphs.py
  pytest_step "triton op vs float64" 75 "$keep" tests/test_ops.py -k triton
  pytest_step "triton kernels, fused base" 60 "$keep" tests/test_kernels.py tests/test_fused_base.py
  # every other cuda-marked test, wherever it is (the files of the steps before and after are left out); among them
  # tests/test_triton_launch.py's: bound launches bit for bit against jit, and no JIT launch once bound (issue 15)
  pytest_step "other cuda-marked" 90 "$keep" -m cuda tests --ignore=tests/test_kernels.py \
    --ignore=tests/test_fused_base.py --ignore=tests/test_cuda_backend.py --ignore=tests/test_multi_reft_triton.py \
    --ignore=tests/test_graphs.py
  # tests that run liger's fused loss on CUDA when there is one (on the CPU its Python part only), not cuda-marked
  pytest_step "liger's loss paths" 45 "$keep" \
    tests/test_preference.py::test_a_resumed_run_warms_up_with_its_tasks_own_loss \
    tests/test_tasks.py::test_training_batches_keep_every_position_under_liger_fused_loss
}

# As time allows: the mixed-batch kernel, the cuda backend (nvcc build, unless the e2e row built it), and
# compute-sanitizer last (a build plus torch under memcheck: it may take all that is left).
stage_tests() {
  banner "tests"
  pytest_step "mixed-batch triton kernel" 45 5 tests/test_multi_reft_triton.py
  pytest_step "cuda backend" 120 5 tests/test_cuda_backend.py tests/test_ops.py -k "cuda and not compute_sanitizer"
  pytest_step "compute-sanitizer" 600 5 tests/test_cuda_backend.py -k compute_sanitizer
}

stage_setup
stage_host
stage_packing
start_cuda_build
stage_correctness
stage_e2e
stage_kernels
stage_tests
banner "done"
echo "--- the cuda backend's background build:"; cat "$SCRATCH/cuda_build.log" 2>/dev/null || echo "(no log)"
ls -l "$OUT"
[ "$DRY_RUN" = 1 ] && rm -rf "$SCRATCH"
exec >&- 2>&-
wait "$TEE_PID"  # session.log complete before the command returns
exit 0
