"""What the op tests share: the family table (derived from the intervention specs), random inputs, and the float64
reference of the edit.

The reference edits the selected rows in float64 (one gather, then index_put); gradients come from autograd through
it. Parameters are dicts of the tensors a family uses (keys Q, P, W, b; an absent key is an unused input), so
``{k: v.double() for k, v in params.items()}`` is the same edit in float64.
"""

import random

import torch
import torch.nn.functional as F

from reft_fast.core.interventions import INTERVENTION_TYPES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def family_row(spec):
    """(uses W, subtracts the projection (P is Q), Q has orthonormal rows): how a spec calls the edit."""
    return spec.source == "linear", spec.subtract, spec.basis == "rotation"


# short name ("loreft") -> family_row, for every intervention type the package defines
FAMILY = {name.removesuffix("Intervention").lower(): family_row(cls.spec) for name, cls in INTERVENTION_TYPES.items()}
ACT_F64 = {None: lambda z: z, "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def make_positions(B, T, n, *, empty_row=True):
    """Distinct positions per row, padded with −1 in random slots; row 0 holds 0 and T−1; the last row may be empty."""
    rows = []
    for i in range(B):
        k = 0 if (empty_row and i == B - 1 and B > 1) else random.randint(1, min(n, T))
        if i == 0 and k >= 2 and T >= 2:
            chosen = [0, T - 1] + random.sample(range(1, T - 1), k - 2)
        else:
            chosen = random.sample(range(T), k)
        row = chosen + [-1] * (n - len(chosen))
        random.shuffle(row)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long, device=DEVICE)


def make_params(family, r, d):
    """The family's tensors in fp32 on DEVICE; P is the same tensor as Q where the family subtracts the projection."""
    uses_w, subtracts, orthonormal = FAMILY[family]
    if orthonormal:
        Q = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))[0].t().float().contiguous().to(DEVICE)
    else:
        Q = (torch.randn(r, d) / d**0.5).to(DEVICE)
    params = {"Q": Q, "b": torch.randn(r).to(DEVICE)}
    if uses_w:
        params["W"] = (torch.randn(r, d) / d**0.5).to(DEVICE)
    if subtracts:
        params["P"] = Q
    return params


def reference(h, positions, params, act=None, keep=None, dropout=0.0):
    """out[b, pos] = keep ⊙ (h + (act(hWᵀ + b) − s·hPᵀ) Q) / (1 − dropout) at the selected rows.

    keep is the [B, n, d] dropout keep-mask; an absent or None key is an unused input (no W: z = b; no P: s = 0)."""
    W, P = params.get("W"), params.get("P")
    b_idx, j_idx = (positions >= 0).nonzero(as_tuple=True)
    t_idx = positions[b_idx, j_idx]
    x = h[b_idx, t_idx]
    z = params["b"].expand(x.shape[0], -1) if W is None else x @ W.t() + params["b"]
    delta = ACT_F64[act](z)
    if P is not None:
        delta = delta - x @ P.t()
    o = x + delta @ params["Q"]
    if keep is not None:
        o = o * keep[b_idx, j_idx] / (1.0 - dropout)
    return h.index_put((b_idx, t_idx), o)


def selected_mask(positions, T):
    """[B, T] bool: True at the rows the positions select."""
    mask = torch.zeros(positions.shape[0], T, dtype=torch.bool, device=positions.device)
    b_idx, j_idx = (positions >= 0).nonzero(as_tuple=True)
    mask[b_idx, positions[b_idx, j_idx]] = True
    return mask


# The triton backend's dots on TF32 tensor cores (16-bit h on CUDA, kernels/low_rank_edit.py launch_config): one TF32
# rounding of the parameters (2^-11) in the projections reaches δ, dz, t and through them every weight gradient. Those
# are checked as the cuda backend's tensor-core path is: the largest error relative to the tensor's largest reference
# magnitude (floored at 1). Under emulated TF32 the worst seen was 5.5e-4 (tests/test_tf32_accuracy.py). Otherwise:
# elementwise rtol = atol = 1e-3.
TF32_WEIGHT_TOL = 2e-3


def triton_on_tf32(backend: str, dtype: torch.dtype) -> bool:
    """Whether ``backend`` forms its products on TF32 here: triton with 16-bit h where its kernels are compiled (on the
    CPU they are interpreted, "ieee", unless tests/test_tf32_accuracy.py emulates the GPU's precision)."""
    from reft_fast.kernels import low_rank_edit as kernels

    if backend != "triton" or dtype == torch.float32:
        return False
    return kernels.launch_config(64, 8, dtype)[4] == "tf32"


def assert_weight_grad_close(got: torch.Tensor, want: torch.Tensor, tf32: bool, name: str) -> None:
    if not tf32:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=f"grad of {name}")
        return
    error = float((got - want).abs().max()) / max(float(want.abs().max()), 1.0)
    assert error <= TF32_WEIGHT_TOL, f"grad of {name}: error {error:.2e} of its largest magnitude (TF32 products)"
