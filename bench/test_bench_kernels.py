"""pytest-benchmark view of bench_kernels.py: `pytest bench/ --benchmark-only` (CUDA: the issue's grid; CPU: smoke).

Same cases, inputs and launchers as the script; pytest-benchmark does the timing (with a device synchronize inside each
timed call on CUDA) and its own statistics, and `--benchmark-json` / `--benchmark-compare` keep history across runs.
After timing, each test checks what the timed call computed: the copies against the source rows, every LoReFT variant's
output and gradients against the float64 reference of tests/reference.py, the orthogonal maps for orthonormal rows. Each
benchmark's extra_info records the device and the shapes read from the tensors it timed.

The default suite (`python -m pytest`, testpaths = tests) does not collect this folder; tests/test_bench_smoke.py runs
one shape of it with `--benchmark-json` and checks that it passes and what the JSON records.
"""

import sys
from pathlib import Path

import pytest
import torch

import bench_kernels as bk
import bench_orthogonal as bo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the float64 reference the op tests use
from reference import reference  # noqa: E402

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


def _record(benchmark, case: dict, **variant) -> None:
    """What this benchmark timed, read from its inputs (not from the test's parameters)."""
    h, positions = case["h"], case["positions"]
    benchmark.extra_info.update(device=bk.environment()["device"], dtype=str(h.dtype).removeprefix("torch."),
                                n_rows=int((positions >= 0).sum()), d=h.shape[-1], r=case["R"].shape[0],
                                batch=h.shape[0], seq_len=h.shape[1], **variant)


def _reference_forward_backward(case: dict):
    """LoReFT's output and the gradients of (h, R, W, b) for the output gradient case["grad"], in float64."""
    h, R, W, b = (case[k].double().requires_grad_() for k in ("h", "R", "W", "b"))
    out = reference(h, case["positions"], {"Q": R, "P": R, "W": W, "b": b})
    out.backward(case["grad"].double())
    return out.detach(), {"h": h.grad, "R": R.grad, "W": W.grad, "b": b.grad}


# bf16 h and output: a few bf16 ulps at |values| up to ~8; the fp32 weight gradients sum N bf16-rounded products.
OUT_TOL = dict(rtol=2e-2, atol=3e-2)
WEIGHT_TOL = dict(rtol=2e-2, atol=2e-2)


def _check(got: dict, case: dict, pass_: str) -> None:
    expected_out, expected_grads = _reference_forward_backward(case)
    if pass_ == "fwd":
        torch.testing.assert_close(got["out"].double(), expected_out, **OUT_TOL)
        return
    torch.testing.assert_close(got["h"].double(), expected_grads["h"], **OUT_TOL, msg="grad of h")
    for name in ("R", "W", "b"):
        torch.testing.assert_close(got[name].double(), expected_grads[name], **WEIGHT_TOL, msg=f"grad of {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("method", ["gather+scatter", "rowcopy"])
def test_copy(benchmark, method, shape):
    case = _case(*shape)
    h, positions = case["h"], case["positions"]
    dst = torch.zeros_like(h)
    if method == "rowcopy":
        fn = lambda: bk.copy_rows_triton(h, dst, positions)  # noqa: E731
    else:
        rows, d = bk.flat_rows(positions, h.shape[1]), h.shape[-1]
        fn = lambda: bk.copy_rows_torch(h.view(-1, d), dst.view(-1, d), rows)  # noqa: E731
    _record(benchmark, case, method=method)
    benchmark(_timed(fn))
    selected = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
    selected.scatter_(1, positions.clamp(min=0), positions >= 0)
    torch.testing.assert_close(dst[selected], h[selected], atol=0, rtol=0)  # every selected row copied
    assert not dst[~selected].any()  # and nothing else written


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
    _record(benchmark, case, backend=backend, level=level, pass_=pass_)
    benchmark(_timed(forward if pass_ == "fwd" else forward_backward, grads if pass_ != "fwd" else ()))
    if pass_ == "fwd":
        got = {"out": forward()}
    elif level == "op":  # the gradients the last timed call left
        got = {name: t.grad for name, t in zip(("h", "R", "W", "b"), grads)}
    else:
        grad_h, dQ, dP, dW, db = forward_backward()
        got = {"h": grad_h, "R": dQ if dP is None else dQ + dP, "W": dW, "b": db}
    _check(got, case, pass_)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", bo.METHODS)
def test_orthogonal(benchmark, method, pass_):
    shape = bo.FULL if CUDA else bo.SMOKE
    forward, forward_backward, params = bo.runners(method, shape["n"], shape["d"], shape["r"], DEVICE)
    benchmark.extra_info.update(device=bk.environment()["device"], method=method, pass_=pass_, **shape)
    benchmark(_timed(forward, ()) if pass_ == "fwd" else _timed(forward_backward, params))
    rotations = forward()
    R = torch.stack([w.t() for w in rotations]) if isinstance(rotations, list) else rotations  # pyreft's is [d, r]
    assert R.shape == (shape["n"], shape["r"], shape["d"])
    eye = torch.eye(shape["r"], device=R.device).expand(shape["n"], -1, -1)
    torch.testing.assert_close(R @ R.transpose(1, 2), eye, rtol=0, atol=1e-5)
