import os
import random

import pytest

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton.jit decorates them.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing is reported by the imports of the tests themselves
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = _HAS_CUDA


def pytest_collection_modifyitems(config, items):
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
