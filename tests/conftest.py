import os
import random

import pytest

# Each xdist worker computes on its share of the cores, as reft_fast gives each CPU rank its share
# (reft_fast.train.distributed): with `-n 2` on 2 cores, two workers of torch's default 2 OpenMP threads each spin-wait
# for cores the other worker holds; the tiny models' many small ops then took 2.3x the CPU time (the classification
# run of 40 steps beside 3 busy processes, 22 s of user time against 9.6 s with one thread, 2026-11-30). Set before
# torch is imported, so the subprocesses the tests start (benches, launchers) inherit it; an explicit setting wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))


def _use_environment_ninja():
    """Every process of the suite (this one, the xdist workers, the runs and launchers they start) builds the C++
    extensions (DeepSpeed's CPU op, the cuda backend's CPU simulation) with the environment's own ninja, as reft-fast's
    command line does: two ninja versions in one process tree rebuilt DeepSpeed's op back and forth. The product's
    function, from its file: importing reft_fast.ops here would import the kernels before TRITON_INTERPRET is set."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "reft_fast" / "ops" / "build_lock.py"
    spec = importlib.util.spec_from_file_location("_reft_fast_build_lock", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.use_environment_ninja()


_use_environment_ninja()

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton.jit decorates them.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
    if _WORKERS > 1:  # in case a plugin imported torch before this file set OMP_NUM_THREADS
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
except Exception:  # pragma: no cover - torch missing is reported by the imports of the tests themselves
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = _HAS_CUDA


# The files that take longest in a run of the whole suite, longest first (seconds summed over their tests, a run on
# 2 shared cores, 2026-11-30): the two workers take them first (pyproject's --no-loadscope-reorder keeps this order),
# and the many short files fill in after them, so that the workers end together instead of one starting a
# two-minute file when the other is nearly done. Sorting by number of tests (xdist's default) put single-test
# compile files last. The GPU session's dry run goes first: its stages have fixed shares of time, which it ran out of
# beside the C++/nvcc builds of test_cuda_backend and test_csrc_compile under load.
# test_bench_e2e moved down once its rows stopped importing their libraries each (its smoke run from 116 s to
# about 30).
SLOW_FILES = ("test_bench_session.py", "test_engine.py", "test_cuda_backend.py", "test_classification.py",
              "test_csrc_compile.py", "test_quantization.py", "test_bench_host.py", "test_engine_real.py",
              "test_triton_compile.py", "test_cli.py", "test_bench_e2e.py", "test_preference.py",
              "test_packing_combinations.py")


def _slow_files_first(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: each file's own order kept


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _slow_files_first(items)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_seed():
    """A new seed for torch and random per test, printed so that a failure can be replayed: REFT_FAST_TEST_SEED=<seed>
    gives every test that seed instead."""
    seed = int(os.environ.get("REFT_FAST_TEST_SEED") or random.randrange(2**31))
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


def pytest_sessionfinish(session, exitstatus):
    """Remove the /dev/shm buffers of DeepSpeed's CPU allreduce (69 MB a rank) that no process maps any more: the
    ranks this suite kills on purpose (a kill during a save, a hung rank) never reach reft_fast's shutdown, which
    removes the others' names. Left there, they filled this machine's /dev/shm over a few runs (22 GB, 2026-11-29)."""
    import glob

    if not hasattr(os, "getuid") or hasattr(session.config, "workerinput"):  # an xdist worker: the controller cleans
        return
    candidates = set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))
    if not candidates:
        return
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(maxsplit=5)[-1].strip() for line in f if "/dev/shm/" in line)
        except OSError:  # a process that ended meanwhile, or one not ours to read
            continue
    for path in candidates - mapped:
        try:
            os.unlink(path)
        except OSError:
            pass
