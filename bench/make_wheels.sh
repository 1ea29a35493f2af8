#!/usr/bin/env bash
# Builds .whl/ (git-ignored): the Python packages the GPU machine's image lacks, for its CPython 3.12 on
# manylinux x86_64, so that bench/gpu_session.sh can install them there without a network (the device tool's `carry`).
# The image already has torch, triton, transformers, peft, accelerate, numpy, pandas, pyarrow, fsspec, xxhash, psutil,
# msgpack, py-cpuinfo, ninja, einops, pytest, matplotlib (see the device notes). Versions are the ones this project
# is tested with on the CPU machines.
#   bash bench/make_wheels.sh            # then: run(command="bash bench/gpu_session.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PIP=("$PY" -m pip --disable-pip-version-check)
# The GPU machine's interpreter and platform, not this machine's.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

rm -rf .whl
mkdir -p .whl
# Pure Python, or one wheel per Python version (multiprocess): --no-deps, every needed one named here.
"${PIP[@]}" download --quiet --no-deps "${TARGET[@]}" -d .whl \
  liger-kernel==0.8.5 \
  pyreft==0.1.0 pyvene==0.1.8 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  hjson==3.1.0 pydantic==2.14.3 annotated-types==0.8.0 typing-inspection==0.4.5
# pydantic's compiled core, for CPython 3.12.
"${PIP[@]}" download --quiet --no-deps "${TARGET[@]}" -d .whl pydantic-core==2.50.4
# DeepSpeed is an sdist only: build a wheel without its CUDA ops (they are JIT-built on first use, if ever).
DS_BUILD_OPS=0 "${PIP[@]}" wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8

ls -1 .whl
du -sh .whl
