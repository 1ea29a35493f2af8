"""Time the orthonormal-row map for all interventions of a step, against pyreft's per-intervention Householder.

    python bench/bench_orthogonal.py            # CUDA: 32 interventions, d=4096, r=8 (target ≤ 0.2 ms fwd+bwd, H100)
    python bench/bench_orthogonal.py --smoke    # CPU: 4 interventions, d=48, r=4
    (python bench/bench_kernels.py runs this too, after the kernels.)

Methods, each forward (R for every intervention) and forward+backward (R.backward(random R̄)):
  polar, cholesky, householder   reft_fast.core.orthogonal.orthonormal_rows on one stacked [n, r, d] parameter
  householder+base               reft_fast.core.orthogonal.HouseholderOrthogonal (pyreft's exact parametrization, batched)
  pyreft-householder             n separate modules under torch.nn.utils.parametrizations.orthogonal, as pyreft's
                                 LoReFT holds them; one .weight access each (a pyreft LoReFT forward makes two)
Writes bench/results/orthogonal_<device>_<date>.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import (  # noqa: E402
    RESULTS,
    bench_device,
    environment,
    measure_ms,
    print_table,
    result_path,
    write_csv,
)

from reft_fast.core.orthogonal import HouseholderOrthogonal, orthonormal_rows, random_orthonormal_rows  # noqa: E402

FULL = dict(n=32, d=4096, r=8)
SMOKE = dict(n=4, d=48, r=4)
TARGET_MS = 0.2  # forward+backward per step, 32 interventions, d=4096, r=8, H100 (issue 2)

FIELDS = ["device", "torch", "triton", "date", "timer", "method", "n", "d", "r", "pass", "ms", "ms_per_intervention",
          "orthonormality_err", "status"]


def _pyreft_style_layers(n: int, d: int, r: int, device) -> list[nn.Module]:
    layers = []
    for _ in range(n):
        layer = nn.Linear(r, d, bias=False, device=device)  # weight [d, r], like pyreft's LowRankRotateLayer
        nn.init.orthogonal_(layer.weight)
        layers.append(nn.utils.parametrizations.orthogonal(layer))
    return layers


METHODS = ("polar", "cholesky", "householder", "householder+base", "pyreft-householder")


def runners(method: str, n: int, d: int, r: int, device):
    """(forward, forward+backward, parameters whose .grad to reset) for one method; forward gives R [n, r, d] or, for
    pyreft's layout, the list of n weights [d, r]."""
    if method in ("polar", "cholesky"):
        start = random_orthonormal_rows(r, d, n=n, device=device)
        A = (start + 0.01 * torch.randn_like(start)).requires_grad_()  # a few steps into training
        forward, params = (lambda: orthonormal_rows(A, method)), [A]
    elif method == "householder":
        # torch's Householder layout, transposed: reflectors above the diagonal, signs (±1, here −1) on it.
        signs = -torch.eye(r, d, device=device).expand(n, r, d)
        reflectors = (signs + 0.1 * torch.randn(n, r, d, device=device).triu(1)).requires_grad_()
        forward, params = (lambda: orthonormal_rows(reflectors, "householder")), [reflectors]
    elif method == "householder+base":
        batched = HouseholderOrthogonal(r, d, n, device=device)
        forward, params = batched, [batched.original]
    elif method == "pyreft-householder":
        layers = _pyreft_style_layers(n, d, r, device)
        forward = lambda: [layer.weight for layer in layers]  # noqa: E731
        params = [layer.parametrizations.weight.original for layer in layers]
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    probe = forward()
    outputs = probe if isinstance(probe, list) else [probe]
    grads = [torch.randn_like(t) for t in outputs]

    def forward_backward():
        out = forward()
        torch.autograd.backward(out if isinstance(out, list) else [out], grads)

    return forward, forward_backward, params


def _orthonormality_error(R) -> float:
    R = torch.stack([w.mT for w in R]) if isinstance(R, list) else R
    R = R.detach().double()
    return (R @ R.mT - torch.eye(R.shape[-2], dtype=torch.float64, device=R.device)).abs().max().item()


def run_orthogonal(shape: dict, device, env: dict, *, reps: int = 5) -> list[dict]:
    n, d, r = shape["n"], shape["d"], shape["r"]
    base = {k: env[k] for k in ("device", "torch", "triton", "date", "timer")}
    rows = []
    for method in METHODS:
        forward, forward_backward, params = runners(method, n, d, r, device)
        for pass_, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            row = dict(base, method=method, n=n, d=d, r=r)
            row["pass"] = pass_
            try:
                if pass_ == "fwd":
                    with torch.no_grad():
                        row["orthonormality_err"] = _orthonormality_error(forward())
                row["ms"] = measure_ms(fn, params if pass_ == "fwd+bwd" else None, reps=reps)
                row["ms_per_intervention"] = row["ms"] / n
                row["status"] = "ok"
            except Exception as exc:  # report and go on
                row["status"] = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]
                print(f"[{method}/{pass_}] {row['status']}")
            rows.append(row)
    return rows


def main(argv=None, *, out: Path | None = None, env: dict | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; for CI")
    parser.add_argument("--out", type=Path, default=out or RESULTS, help="folder for the CSV (default bench/results)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("the full case (32 × 4096 × 4096 Householder bases) needs a CUDA GPU; on a CPU use --smoke")
    env = env or environment()
    shape = SMOKE if args.smoke else FULL
    print(f"# orthogonal map: {shape['n']} interventions, d={shape['d']}, r={shape['r']} | {env['device']} | "
          f"{env['timer']} | target (H100, full shape) fwd+bwd ≤ {TARGET_MS} ms")
    rows = run_orthogonal(shape, bench_device(), env, reps=3 if args.smoke else 5)
    print_table(rows, ["method", "pass", "n", "d", "r", "ms", "ms_per_intervention", "orthonormality_err", "status"])
    path = write_csv(rows, result_path(args.out, "orthogonal_smoke" if args.smoke else "orthogonal", env, ".csv"),
                     FIELDS)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
