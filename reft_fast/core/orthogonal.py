"""Orthonormal-row matrices R for every intervention at once: one batched call per training step.

LoReFT-style interventions need R [r, d] with orthonormal rows (R Rᵀ = I). The optimizer works on an unconstrained
A [r, d] per intervention; ``orthonormal_rows`` maps a stack A [n, r, d] of all of them to R [n, r, d] in one call, so
the cost per step is a handful of batched kernels instead of pyreft's per-intervention Householder product recomputed
at every ``.weight`` access (forward + backward 3.4 ms per intervention per access at d=4096, r=8; measured on one
H100 80GB with torch 2.11, 2026-11-23).

Methods (all differentiable, all batched over any leading dimensions). The interventions' default is
``"householder"`` with a trivialization base (``HouseholderOrthogonal``), pyreft's own map; see below for why.

``"polar"`` — R = (A Aᵀ)^(-1/2) A, the orthonormal-row matrix nearest to A.
    The r×r inverse square root comes from one batched symmetric eigendecomposition of G = A Aᵀ. Its backward is
    written out (``_PolarRows``) with the Daleckii–Krein divided differences of x^(-1/2),
        F_ij = (λi^(-1/2) − λj^(-1/2)) / (λi − λj) = −1 / (√λi √λj (√λi + √λj)),
    which stay finite when eigenvalues coincide. That matters: at an orthonormal A (how training starts, and where R
    stays close to) G = I and all eigenvalues are equal, where the eigenvector gradient of ``torch.linalg.eigh`` divides
    by λi − λj = 0. Exact at orthonormal input (G = I gives R = A up to rounding), equivariant under rotations on
    both sides, no preference among the rows, well defined for any full-row-rank A.
``"cholesky"`` — R = L⁻¹ A with G = L Lᵀ (Cholesky-QR: Gram–Schmidt of the rows; row 1 of R is row 1 of A normalized).
    Three kernels forward (matmul, ``cholesky_ex``, triangular solve) and autograd backward; never synchronizes with
    the host (``cholesky_ex`` reports failures in a tensor instead of raising). Exact at orthonormal input. It treats
    the rows unequally: its gradient at an orthonormal A removes a triangular, not the symmetric, part of R̄ Aᵀ.
``"householder"`` — torch's orthogonal parametrization without trivialization base: A is read as the transpose of
    ``parametrizations.weight.original`` (reflectors below the diagonal, signs on the diagonal). Not the identity on
    orthonormal input. ``HouseholderOrthogonal`` adds the base and reproduces pyreft's rotate layer exactly: that is
    what an intervention with ``orthogonalization="householder"`` holds.

Both ``"polar"`` and ``"cholesky"`` work from G = A Aᵀ, so in fp32 their loss of orthonormality grows like
κ(A)² · eps (about 1e-5 at κ(A) = 10); in training A starts orthonormal (κ = 1) and drifts slowly.

Why ``"householder"`` (with its base) is the interventions' default: the ReFT paper's learning rates were tuned
with it, and at those rates the other maps train more slowly. Near the start, a step of size η on a reflector entry
moves R by 2η (a reflection doubles the angle), while a step on A moves the polar or Cholesky R by about η; with Adam,
whose steps have a fixed size, the Householder map therefore trains like the others at twice the learning rate
(bench/bench_orthogonal_convergence.py and bench/NOTES.md, "Orthogonalization default", hold the study). Its base
costs O(d·r) when held in compact form (QR reflectors, what new interventions hold), d² floats when explicit
(pyreft's own, 64 MiB in fp32 at d = 4096, kept for interventions loaded from pyreft).

What ``"polar"`` offers instead: at an orthonormal A its gradient is R̄ − sym(R̄ Aᵀ) A, the projection of R̄ that
Riemannian gradient descent on the Stiefel manifold uses; it treats all rows alike (no Gram–Schmidt order); its cost
is matmul-sized (two r×r×d products forward, three backward, one batched r×r eigendecomposition) with no base.
``torch.linalg.eigh`` on CUDA synchronizes with the host (there is no ``eigh_ex``); ``"cholesky"`` never does.
bench/bench_orthogonal.py times the maps against pyreft's per-intervention Householder.

Parameters must be float32 (float64 is accepted so that gradients can be checked with ``torch.autograd.gradcheck``).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "METHODS",
    "orthonormal_rows",
    "random_orthonormal_rows",
    "householder_rows",
    "batched_householder_rows",
    "compact_base",
    "HouseholderOrthogonal",
]

METHODS = ("polar", "cholesky", "householder")
_PARAM_DTYPES = (torch.float32, torch.float64)


def _check_unconstrained(A, name: str = "A") -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in _PARAM_DTYPES:
        raise TypeError(f"{name} must be float32 (float64 for gradient checks), got {A.dtype}")
    if A.dim() < 2:
        raise ValueError(f"{name} must have shape [..., rank, hidden], got shape {list(A.shape)}")
    r, d = A.shape[-2:]
    if r < 1 or d < 1:
        raise ValueError(f"{name} must have rank ≥ 1 and hidden ≥ 1, got shape {list(A.shape)}")
    if r > d:
        raise ValueError(f"{name} has rank {r} > hidden size {d}: at most d rows of length d can be orthonormal")


# --------------------------------------------------------------------------------------------------------------------
# polar: R = (A Aᵀ)^(-1/2) A with a Daleckii–Krein backward
# --------------------------------------------------------------------------------------------------------------------
class _PolarRows(torch.autograd.Function):
    """Forward:  G = A Aᵀ = U diag(λ) Uᵀ,  S = U diag(λ^(-1/2)) Uᵀ,  R = S A.

    Backward for R̄ = ∂L/∂R:
        S̄ = R̄ Aᵀ                                   (through R = S A, the S factor)
        Ḡ = U (F ∘ (Uᵀ S̄ U)) Uᵀ                     (Daleckii–Krein; F symmetric, finite at λi = λj)
        Ā = S R̄ + (Ḡ + Ḡᵀ) A                        (the A factor of R = S A, and G = A Aᵀ)
    """

    @staticmethod
    def forward(ctx, A):
        gram = A @ A.mT
        eigvals, U = torch.linalg.eigh(gram)
        root = eigvals.sqrt()
        S = (U / root.unsqueeze(-2)) @ U.mT
        R = S @ A
        ctx.save_for_backward(A, U, root, S)
        return R

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_R):
        A, U, root, S = ctx.saved_tensors
        grad_S = grad_R @ A.mT
        ri, rj = root.unsqueeze(-1), root.unsqueeze(-2)
        divided_diff = -1.0 / (ri * rj * (ri + rj))
        grad_G = U @ (divided_diff * (U.mT @ grad_S @ U)) @ U.mT
        return S @ grad_R + (grad_G + grad_G.mT) @ A


def _cholesky_rows(A: torch.Tensor) -> torch.Tensor:
    # cholesky_ex: a failed factorization (rank-deficient A) shows up as NaN in R instead of a host-synchronizing raise.
    L, _ = torch.linalg.cholesky_ex(A @ A.mT)
    return torch.linalg.solve_triangular(L, A, upper=False)


# --------------------------------------------------------------------------------------------------------------------
# householder: torch.nn.utils.parametrizations.orthogonal's default map for a tall d×r weight, in compact WY form
# --------------------------------------------------------------------------------------------------------------------
def householder_rows(original: torch.Tensor, base: Optional[torch.Tensor] = None,
                     base_tau: Optional[torch.Tensor] = None) -> torch.Tensor:
    """R [..., r, d] = (B @ householder(original)) transposed: torch's orthogonal parametrization of a d×r weight.

    ``original`` [..., d, r] holds reflector j below the diagonal of column j (v_j = e_j + original[j+1:, j]) and, on
    the diagonal, the sign of column j. B is the trivialization base (``use_trivialization=True``), given as
      * nothing (``base=None``): the identity;
      * ``base`` [..., d, d]: the explicit matrix (pyreft's form);
      * ``base`` [..., d, r] with ``base_tau`` [..., r]: its compact form, the output of ``torch.geqrf`` on the start
        (``compact_base``): B = H_1 ⋯ H_r · diag(s, 1, …, 1) with H_j geqrf's reflectors and s the signs of the
        diagonal of ``base`` (the triangular factor's), so that B's first r columns are the factored matrix when its
        columns are orthonormal. Applied with ``torch.ormqr`` in O(d·r²), without forming B.

    Deliberate difference from torch: the sign is read with ``sign()``, where torch truncates the entry to an integer.
    The two agree while the diagonal holds ±1, which is always the case without weight decay (the diagonal gets no
    gradient). With AdamW's decoupled weight decay the entry becomes −(1 − lr·wd) after one step, which torch truncates
    to 0: every column, hence R, becomes zero and the intervention stops training, silently (pyreft inherits this).
    """
    if not isinstance(original, torch.Tensor):
        raise TypeError(f"original must be a torch.Tensor, got {type(original).__name__}")
    _check_unconstrained(original.mT, "original (transposed)")
    _check_base(original, base, base_tau)
    columns = _householder_columns(original)
    if base is None:
        R = columns.mT
    elif base_tau is None:
        # R = Qᵀ baseᵀ in this order: its rows come out contiguous, and on the CPU it is about 2× faster than base @ Q.
        R = columns.mT @ base.mT
    else:
        R = _compact_base_times(base, base_tau, columns).mT
    # The fused backends read R by rows and assume a contiguous [r, d] (a transposed view gave them wrong results).
    return R.contiguous()


def _check_base(original: torch.Tensor, base, base_tau) -> None:
    *batch, d, r = original.shape
    if base_tau is None:
        expected = {"base": (*batch, d, d)} if base is not None else {}
    else:
        expected = {"base": (*batch, d, r), "base_tau": (*batch, r)}
    labels = {"base": "base (explicit, d×d)" if base_tau is None else "base (compact: geqrf's reflectors)",
              "base_tau": "base_tau"}
    for name, shape in expected.items():
        value = base if name == "base" else base_tau
        if not isinstance(value, torch.Tensor) or value.dtype != original.dtype or tuple(value.shape) != shape:
            raise ValueError(f"{labels[name]} must be a {original.dtype} tensor of shape {list(shape)} for original "
                             f"{list(original.shape)}, got {getattr(value, 'dtype', type(value).__name__)} "
                             f"{list(getattr(value, 'shape', []))}")


def _householder_columns(original: torch.Tensor) -> torch.Tensor:
    """householder(original) [..., d, r]: the first r columns of H_1 ⋯ H_r times the diagonal's signs.

    torch builds H_1 ⋯ H_r with ``linalg.householder_product`` (sequential reflections, slow backward). The same product
    in compact WY form is matmul-only: H_1 ⋯ H_r = I − V T Vᵀ with T upper triangular and
    T⁻¹ = striu(Vᵀ V) + diag(1/τ), τ_j = 2 / ‖v_j‖² (torch's tau), so its first r columns are E − V T V[:r]ᵀ.
    """
    d, r = original.shape[-2:]
    eye = torch.eye(d, r, dtype=original.dtype, device=original.device)
    V = original.tril(-1) + eye
    VtV = V.mT @ V
    T_inv = VtV.triu(1) + torch.diag_embed(VtV.diagonal(dim1=-2, dim2=-1) / 2)  # 1/τ_j = ‖v_j‖²/2
    Q = eye - V @ torch.linalg.solve_triangular(T_inv, V[..., :r, :].mT, upper=True)
    # The diagonal carries ±1 signs and is not trained (torch's int cast cuts its gradient; so does detach here).
    return Q * original.detach().diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)


def compact_base(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A trivialization base whose first r columns are ``columns`` [..., d, r] (orthonormal), in compact form:
    ``torch.geqrf``'s reflectors [..., d, r] and tau [..., r] (see ``householder_rows``); O(d·r) memory.

    Factored in float64 and returned in ``columns``' dtype. Runs once, when an intervention is created or loaded.
    """
    reflectors, tau = torch.geqrf(columns.double())
    return reflectors.to(columns.dtype), tau.to(columns.dtype)


def _compact_base_times(reflectors: torch.Tensor, tau: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """B @ M for the compact base (reflectors, tau) and M [..., d, k]: H_1 ⋯ H_r (diag(s, 1, …, 1) M).

    On the CPU ``torch.ormqr`` applies the reflectors without forming B (autograd differentiates it w.r.t. M; the base
    gets no gradient). Elsewhere ``_compact_wy_times``: torch's CUDA ``ormqr`` makes one cuSOLVER call per matrix of
    the batch from a host loop, and its backward more: the map took 9.6 ms of a 7B step for 32 interventions on an H200
    (2026-11-30). Neither path reads a value on the host, so on CUDA no step waits for the device.
    """
    r = tau.shape[-1]
    signs = reflectors.detach().diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-1)
    M = torch.cat([M[..., :r, :] * signs, M[..., r:, :]], dim=-2)
    if M.device.type == "cpu":  # about 2× faster than the matmul form there (one thread, n = 32, d = 4096, r = 8)
        return torch.ormqr(reflectors, tau, M)
    return _compact_wy_times(reflectors, tau, M)


def _compact_wy_times(reflectors: torch.Tensor, tau: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """H_1 ⋯ H_r @ M for geqrf's reflectors and tau, as batched matrix products (compact WY form, as in
    ``_householder_columns``): H_1 ⋯ H_r = I − V T Vᵀ with V the unit lower trapezoidal reflectors and
    T⁻¹ = striu(Vᵀ V) + diag(1/τ). A τ of 0 (a reflector that is the identity) gives an infinite diagonal entry, whose
    solve is 0: that H_j drops out, as in LAPACK. Every operation is batched: a fixed handful of launches whatever the
    batch."""
    d, r = reflectors.shape[-2:]
    V = reflectors.detach().tril(-1) + torch.eye(d, r, dtype=M.dtype, device=M.device)
    T_inv = (V.mT @ V).triu(1) + torch.diag_embed(tau.detach().reciprocal())
    return M - V @ torch.linalg.solve_triangular(T_inv, V.mT @ M, upper=True)


def batched_householder_rows(inputs: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """R [n, r, d] for n rotate layers of one [d, r] shape, from their ``HouseholderOrthogonal.rotation_inputs()``.

    Layers with a compact base run as one batched call; only their O(d·r) tensors are stacked. Layers with an explicit
    d×d base (pyreft's, loaded) each run alone: stacking their bases would copy n·d² floats every step (2 GiB for 32
    layers at d = 4096), kept until the backward. Alone, each product reads its base in place.
    """
    rows: list[Optional[torch.Tensor]] = [None] * len(inputs)
    compact = [i for i, group in enumerate(inputs) if len(group) == 3]
    if len(compact) == len(inputs):  # the usual case: the batched result as it is (no unbind and stack again)
        return householder_rows(*(torch.stack([group[k] for group in inputs]) for k in range(3)))
    if compact:
        stacked = [torch.stack([inputs[i][k] for i in compact]) for k in range(3)]
        for i, R in zip(compact, householder_rows(*stacked).unbind(0)):
            rows[i] = R
    for i, group in enumerate(inputs):
        if len(group) != 3:
            rows[i] = householder_rows(*group)
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------
def orthonormal_rows(A: torch.Tensor, method: str = "polar") -> torch.Tensor:
    """Map unconstrained A [..., r, d] (r ≤ d) to R [..., r, d] with orthonormal rows, differentiably, in one batch.

    Stack the parameters of all interventions into one [n, r, d] tensor (or keep them in one such parameter) and call
    this once per step. ``"polar"`` and ``"cholesky"`` return A itself (to rounding) when A's rows are already
    orthonormal; A must have full row rank (a rank-deficient A gives non-finite values). See the module docstring for
    the methods and why interventions default to ``"householder"`` (with a base, ``HouseholderOrthogonal``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    _check_unconstrained(A)
    if method == "householder":
        return householder_rows(A.mT)
    if method == "polar":
        return _PolarRows.apply(A)
    return _cholesky_rows(A)


def random_orthonormal_rows(
    r: int,
    d: int,
    *,
    n: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Haar-random R with orthonormal rows: [r, d], or [n, r, d] when n is given.

    Drawn on the CPU (reproducible with ``generator`` whatever the target device) in float64, then cast and moved.
    """
    for name, value in (("r", r), ("d", d)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if r > d:
        raise ValueError(f"r={r} > d={d}: at most d rows of length d can be orthonormal")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    if dtype not in _PARAM_DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    shape = (d, r) if n is None else (n, d, r)
    Q, upper = torch.linalg.qr(torch.randn(shape, generator=generator, dtype=torch.float64))
    # Fixing the signs of R's diagonal makes the QR factor unique, hence Haar-distributed.
    Q = Q * upper.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)
    return Q.mT.contiguous().to(dtype=dtype, device=device)


class HouseholderOrthogonal(nn.Module):
    """pyreft's rotate layer, batched: R [n, r, d] = (B @ householder(original))ᵀ for n interventions at once.

    Computes what ``torch.nn.utils.parametrizations.orthogonal`` computes on a d×r weight (default map Householder,
    ``use_trivialization=True``, as pyreft's ``LowRankRotateLayer``) from the parameter ``original`` [n, d, r] and a
    fixed orthogonal trivialization base B: ``forward()`` gives the same R (transposed weight) and ``original`` gets
    the same gradients, so training follows pyreft's parametrization step for step. Without ``n`` the leading
    dimension is dropped ([d, r], R [r, d]).

    The base is held in one of two forms (``householder_rows``), chosen by what the layer was built or loaded from:
      * compact, for a new layer or one started from rotate weights: buffers ``base_reflectors`` [n, d, r] and
        ``base_tau`` [n, r], the QR reflectors of the start. Any orthogonal completion of the start is a valid base;
        this one costs O(d·r) memory and O(d·r²) time per step instead of d² (64 MiB per layer at d = 4096).
      * explicit, for pyreft's exact state: buffer ``base`` [n, d, d]. An arbitrary orthogonal d×d matrix takes d
        reflectors to store, so converting it would save nothing.
    ``load_state_dict`` switches to the form of the state it is given (so reft-fast directories saved with an explicit
    base still load).

    ``original``'s diagonal holds ±1 signs; weight decay shrinks it but, unlike torch's integer cast, ``sign()`` keeps
    it (see ``householder_rows``).
    """

    _COMPACT = ("base_reflectors", "base_tau")
    _EXPLICIT = ("base",)

    def __init__(self, r: int, d: int, n: Optional[int] = None, *, generator: Optional[torch.Generator] = None,
                 device: Union[str, torch.device, None] = None):
        super().__init__()
        # Same starting point as pyreft: a random orthonormal weight, stored in the base, with original = −I.
        start = random_orthonormal_rows(r, d, n=n, generator=generator).mT
        reflectors, tau = compact_base(start)
        self.original = nn.Parameter(self._minus_identity(start.shape[:-2], d, r).to(device))
        self.register_buffer("base_reflectors", reflectors.to(device))
        self.register_buffer("base_tau", tau.to(device))

    @staticmethod
    def _minus_identity(batch_shape, d: int, r: int) -> torch.Tensor:
        # householder(−I) = I[:, :r], so R = B[:, :r]ᵀ at the start (torch's right_inverse returns the same −I).
        return (-torch.eye(d, r)).expand(*batch_shape, d, r).clone()

    @property
    def has_explicit_base(self) -> bool:
        return "base" in self._buffers

    def rotation_inputs(self) -> tuple[torch.Tensor, ...]:
        """(original, base_reflectors, base_tau) or (original, base): ``householder_rows``' arguments.

        Read from the module's own dicts (every forward of a ReftModel reads it for every intervention; attribute
        access through ``nn.Module.__getattr__`` cost 6 µs here, 2026-11-30)."""
        buffers = self._buffers
        names = self._EXPLICIT if "base" in buffers else self._COMPACT
        return (self._parameters["original"], *(buffers[name] for name in names))

    def forward(self) -> torch.Tensor:
        return householder_rows(*self.rotation_inputs())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The state decides the base's form: pyreft's state and reft-fast directories saved before compact bases
        # hold the explicit d×d base. Its buffers are replaced by empty ones of the state's form, then filled.
        explicit = prefix + "base" in state_dict
        if explicit != self.has_explicit_base and (explicit or prefix + "base_reflectors" in state_dict):
            *batch, d, r = self.original.shape
            like = dict(dtype=self.original.dtype, device=self.original.device)
            for name in self._COMPACT if explicit else self._EXPLICIT:
                delattr(self, name)
            if explicit:
                self.register_buffer("base", torch.empty(*batch, d, d, **like))
            else:
                self.register_buffer("base_reflectors", torch.empty(*batch, d, r, **like))
                self.register_buffer("base_tau", torch.empty(*batch, r, **like))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_pyreft(cls, layers: Union[nn.Module, Sequence[nn.Module]]) -> "HouseholderOrthogonal":
        """Copy the exact state of pyreft rotate layers (or of interventions holding one as ``.rotate_layer``).

        Each must carry torch's orthogonal parametrization on a d×r ``weight`` (``parametrizations.weight.original``
        and ``parametrizations.weight[0].base``). A single module gives an unbatched layer; a sequence gives [n, ...].
        """
        single = isinstance(layers, nn.Module)
        modules = [layers] if single else list(layers)
        if not modules:
            raise ValueError("layers must hold at least one pyreft rotate layer")
        originals, bases = [], []
        for i, module in enumerate(modules):
            module = getattr(module, "rotate_layer", module)
            parametrization = getattr(getattr(module, "parametrizations", None), "weight", None)
            base = getattr(parametrization[0], "base", None) if parametrization is not None else None
            if parametrization is None or base is None:
                raise TypeError(f"layers[{i}] ({type(module).__name__}) has no orthogonal parametrization with a "
                                "trivialization base on 'weight' (torch.nn.utils.parametrizations.orthogonal)")
            originals.append(parametrization.original.detach())
            bases.append(base.detach())
        shapes = {tuple(o.shape) for o in originals}
        if len(shapes) != 1:
            raise ValueError(f"all rotate layers must have the same [d, r] shape, got {sorted(shapes)}")
        return cls._from_state(torch.stack(originals), {"base": torch.stack(bases)}, single)

    @classmethod
    def from_rotate_weights(cls, weights: Union[torch.Tensor, Iterable[torch.Tensor]]) -> "HouseholderOrthogonal":
        """Start from saved pyreft rotate weights (``intkey_*.bin``'s ``"rotate_layer"``, [d, r], orthonormal columns).

        R starts equal to the weights (transposed), with original = −I and a compact base completing them.
        Deliberate difference from pyreft's loader, which writes the weights into the first columns of a fresh random
        base without re-orthogonalizing the rest, so its R stops being orthonormal after the first update.
        """
        single = isinstance(weights, torch.Tensor) and weights.dim() == 2
        stacked = weights if isinstance(weights, torch.Tensor) else torch.stack(list(weights))
        stacked = stacked.unsqueeze(0) if single else stacked
        _check_unconstrained(stacked.mT, "weights (transposed)")
        d, r = stacked.shape[-2:]
        gram = stacked.double().mT @ stacked.double()
        eye = torch.eye(r, dtype=torch.float64, device=stacked.device)
        if not torch.allclose(gram, eye, atol=1e-4):
            raise ValueError("weights must have orthonormal columns (pyreft's rotate_layer weight, [d, r])")
        reflectors, tau = compact_base(stacked.detach())
        original = cls._minus_identity(stacked.shape[:-2], d, r).to(dtype=stacked.dtype, device=stacked.device)
        return cls._from_state(original, {"base_reflectors": reflectors, "base_tau": tau}, single)

    @classmethod
    def _from_state(cls, original: torch.Tensor, base: dict, single: bool) -> "HouseholderOrthogonal":
        if original.dtype != torch.float32:
            raise TypeError(f"rotate layer parameters must be float32, got {original.dtype}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.original = nn.Parameter(original[0].clone() if single else original.clone())
        for name, value in base.items():
            layer.register_buffer(name, value[0].clone() if single else value.clone())
        return layer

    def extra_repr(self) -> str:
        *batch, d, r = self.original.shape
        return f"n={batch[0] if batch else None}, r={r}, d={d}"
