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
    """A new seed for torch and random per test, printed so that a failure can be replayed."""
    seed = random.randrange(2**31)
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
    random.seed(seed)
    return seed
