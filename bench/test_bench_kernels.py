"""pytest-benchmark view of bench_kernels.py: `pytest bench/ --benchmark-only` (CUDA: the issue's grid; CPU: smoke).

Same cases, inputs and launchers as the script; pytest-benchmark does the timing (with a device synchronize inside each
timed call on CUDA) and its own statistics, and `--benchmark-json` / `--benchmark-compare` keep history across runs.
"""

import pytest
import torch

import bench_kernels as bk
import bench_orthogonal as bo

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
GRID = bk.FULL if CUDA else bk.SMOKE
SHAPES = [(n, d, r) for n in GRID["rows"] for d in GRID["d"] for r in GRID["r"]]
BACKENDS = bk.available_backends(DEVICE)


@pytest.fixture(scope="module", autouse=True)
def _single_cpu_thread():
    # See bench_kernels.main: on a small shared CPU, OpenMP spin-waits make tiny ops swing by 100×.
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timed(fn, grads=()):
    def run():
        for t in grads:
            t.grad = None
        fn()
        if CUDA:
            torch.cuda.synchronize()

    return run


def _case(n, d, r):
    return bk.make_case(n, d, r, batch=GRID["batch"], min_seq=GRID["min_seq"], device=DEVICE)


def _shape_id(shape):
    return "N{}-d{}-r{}".format(*shape)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("method", ["gather+scatter", "rowcopy"])
def test_copy(benchmark, method, shape):
    case = _case(*shape)
    h, positions = case["h"], case["positions"]
    dst = h.clone()
    if method == "rowcopy":
        fn = lambda: bk.copy_rows_triton(h, dst, positions)  # noqa: E731
    else:
        rows, d = bk.flat_rows(positions, h.shape[1]), h.shape[-1]
        fn = lambda: bk.copy_rows_torch(h.view(-1, d), dst.view(-1, d), rows)  # noqa: E731
    benchmark.extra_info.update(method=method, n_rows=shape[0], d=shape[1], r=shape[2])
    benchmark(_timed(fn))
    torch.testing.assert_close(dst, h, atol=0, rtol=0)  # the copy touched only rows that hold the same values


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("level", ["op", "kernel"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_loreft(benchmark, backend, level, pass_, shape):
    module = BACKENDS[backend]
    if isinstance(module, str):
        pytest.skip(module)
    if level == "kernel" and module is None:
        pytest.skip("the torch reference has no launch functions")
    case = _case(*shape)
    if level == "op":
        forward, forward_backward, grads = bk.op_runners(case, backend)
    else:
        (forward, forward_backward), grads = bk.kernel_runners(case, module), []
    benchmark.extra_info.update(backend=backend, level=level, pass_=pass_, n_rows=shape[0], d=shape[1], r=shape[2])
    benchmark(_timed(forward if pass_ == "fwd" else forward_backward, grads if pass_ != "fwd" else ()))


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", bo.METHODS)
def test_orthogonal(benchmark, method, pass_):
    shape = bo.FULL if CUDA else bo.SMOKE
    forward, forward_backward, params = bo.runners(method, shape["n"], shape["d"], shape["r"], DEVICE)
    benchmark.extra_info.update(method=method, pass_=pass_, **shape)
    benchmark(_timed(forward, ()) if pass_ == "fwd" else _timed(forward_backward, params))
