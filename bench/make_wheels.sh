#!/usr/bin/env bash
# Builds .whl/ (git-ignored): every Python package bench/gpu_session.sh needs that the GPU machine's image lacks, for
# that image's CPython 3.12 on manylinux x86_64, so that the session installs them there without a network:
#   bash bench/make_wheels.sh            # then: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# The image (as its package list read on 2026-11-17, and python3 on the machine, 2026-11) has Python 3.12, torch 2.11,
# triton 3.6, transformers 5.17, peft, accelerate, huggingface-hub, numpy, pandas, pyarrow, fsspec, xxhash, psutil,
# msgpack, py-cpuinfo, ninja, einops, nvidia-ml-py, matplotlib, pytest and an older typing-extensions; not the ones
# below. WHEELS is every package that `import pyreft, deepspeed, liger_kernel.transformers` and reft-fast's own
# editable install need beyond the image (tests/test_bench_session.py checks the list against the imports), at the
# versions this project's CPU test environment runs:
#   liger-kernel                     the fused base (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy)
#   pyreft, pyvene, datasets, dill, multiprocess
#                                    the pyreft rows (pyreft imports datasets at import time)
#   deepspeed, hjson, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions
#                                    reft_fast.train's DeepSpeed (pydantic 2.14 fails to import with
#                                    typing-extensions 4.12; it needs ≥ 4.16)
#   bitsandbytes                     model.quantization (int8/nf4/fp4 bases; peft imports it whenever it is installed,
#                                    so the session's imports include it; 43 MB of the 64 MiB a carry may hold)
#   setuptools                       reft-fast's editable install (`license = "Apache-2.0"` needs setuptools ≥ 77)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PIP=("$PY" -m pip --disable-pip-version-check)
# The GPU machine's interpreter and platform, not this machine's.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
WHEELS=(
  liger-kernel==0.8.5
  pyreft==0.1.0
  pyvene==0.1.8
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  bitsandbytes==0.50.2
  setuptools==84.2.1
)
# DeepSpeed is an sdist only: built here into a wheel without its CUDA ops (they are JIT-built on first use, if ever).
DEEPSPEED=deepspeed==0.19.8

rm -rf .whl
mkdir -p .whl
# --no-deps: every package needed is named above (or is on the image); pydantic-core and multiprocess come as the
# CPython 3.12 builds.
"${PIP[@]}" download --quiet --no-deps "${TARGET[@]}" -d .whl "${WHEELS[@]}"
DS_BUILD_OPS=0 "${PIP[@]}" wheel --quiet --no-deps --no-build-isolation -w .whl "$DEEPSPEED"

# One file per package, every one installable by the GPU machine's Python (a second version would stop the install).
"${PIP[@]}" install --quiet --dry-run --no-index --no-deps --ignore-installed "${TARGET[@]}" --target "$(mktemp -d)" \
  .whl/*.whl
count=$(find .whl -type f -name '*.whl' | wc -l)
if [ "$count" -ne $((${#WHEELS[@]} + 1)) ]; then
  echo "make_wheels: expected $((${#WHEELS[@]} + 1)) wheels in .whl, found $count" >&2
  exit 1
fi
ls -1 .whl
du -sh .whl
