"""reft_fast.core.orthogonal: orthonormal-row maps against float64 references written here, gradients, pyreft parity."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from reft_fast.core.interventions import compute_rotations
from reft_fast.core.orthogonal import (
    METHODS,
    HouseholderOrthogonal,
    householder_rows,
    orthonormal_rows,
    random_orthonormal_rows,
)

SHAPES = [(1, 100), (3, 100), (8, 100), (64, 100), (1, 1000), (3, 1000), (8, 1000), (64, 1000), (5, 5)]


def _orthonormality_error(R: torch.Tensor) -> float:
    eye = torch.eye(R.shape[-2], dtype=torch.float64)
    return (R.double() @ R.double().mT - eye).abs().max().item()


def _polar_reference(A: torch.Tensor) -> torch.Tensor:
    # Nearest orthonormal-row matrix from the SVD A = U Σ Vᵀ: U Vᵀ.
    U, _, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return U @ Vh


def _gram_schmidt_reference(A: torch.Tensor) -> torch.Tensor:
    # Rows of A orthonormalized in order: the Q factor of Aᵀ with a positive diagonal in its R factor.
    Q, upper = torch.linalg.qr(A.double().mT)
    return (Q * upper.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)).mT


def _well_conditioned(r: int, d: int, n: int = 2) -> torch.Tensor:
    # Gaussian rows plus an orthonormal part: random directions, singular values spread over about [0.5, 2.5].
    return random_orthonormal_rows(r, d, n=n) + torch.randn(n, r, d) / (2 * d**0.5)


@pytest.mark.parametrize("r, d", SHAPES)
@pytest.mark.parametrize("method", ["polar", "cholesky"])
def test_random_input_gives_orthonormal_rows_equal_to_reference(method, r, d):
    # Square Gaussians are often nearly singular (κ² eps ≈ 1 would make the check empty): shift them off it.
    A = torch.randn(2, r, d) if r < d else _well_conditioned(r, d)
    R = orthonormal_rows(A, method)
    assert R.shape == A.shape and R.dtype == torch.float32
    # fp32: both maps work from A Aᵀ, so the error grows like κ(A)² eps; the square 5×5 Gaussian is the hard case.
    reference = _polar_reference(A) if method == "polar" else _gram_schmidt_reference(A)
    cond = torch.linalg.cond(A.double()).max().item()
    tol = 2e-6 * max(cond**2, 10.0)
    assert _orthonormality_error(R) < tol
    torch.testing.assert_close(R.double(), reference, atol=tol * max(cond, 1.0), rtol=0)


@pytest.mark.parametrize("r, d", SHAPES)
@pytest.mark.parametrize("method", ["polar", "cholesky"])
def test_exact_at_orthonormal_input(method, r, d):
    Q = random_orthonormal_rows(r, d, n=3)
    R = orthonormal_rows(Q, method)
    assert (R - Q).abs().max().item() < 2e-6


@pytest.mark.parametrize("method", ["polar", "cholesky"])
@pytest.mark.parametrize("r, d", [(1, 6), (3, 7), (4, 4), (5, 12)])
def test_gradcheck_float64_random_and_degenerate(method, r, d):
    # Random A with singular values in [0.5, 2]: the maps' derivatives grow like 1/σ_min, and finite differences at a
    # nearly singular draw (σ_min 1e-3: 1 square 4×4 Gaussian draw in 200) disagree with any exact gradient.
    U = torch.linalg.qr(torch.randn(2, r, r, dtype=torch.float64))[0]
    singular_values = 0.5 + 1.5 * torch.rand(2, r, 1, dtype=torch.float64)
    A = (U @ (singular_values * random_orthonormal_rows(r, d, n=2, dtype=torch.float64))).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: orthonormal_rows(a, method), (A,))
    # At an orthonormal input every eigenvalue of A Aᵀ is 1: eigh's own backward divides by λi − λj = 0 there.
    Q = random_orthonormal_rows(r, d, n=2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: orthonormal_rows(a, method), (Q,))


def test_polar_gradient_at_orthonormal_input_has_its_closed_form():
    # At A A ᵀ = I every eigenvalue is 1 (where eigh's eigenvector backward divides by zero); there the polar map's
    # gradient is R̄ − sym(R̄ Aᵀ) A: the tangent part of R̄ plus its component off the row space.
    Q = random_orthonormal_rows(4, 9, n=2, dtype=torch.float64).requires_grad_()
    grad_R = torch.randn(2, 4, 9, dtype=torch.float64)
    (orthonormal_rows(Q, "polar") * grad_R).sum().backward()
    A = Q.detach()
    sym = (grad_R @ A.mT + A @ grad_R.mT) / 2
    torch.testing.assert_close(Q.grad, grad_R - sym @ A, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_matrix(method):
    A = (_well_conditioned(4, 50, n=6).reshape(3, 2, 4, 50)).requires_grad_()
    weights = torch.randn(3, 2, 4, 50)
    R = orthonormal_rows(A, method)
    (R * weights).sum().backward()
    for i in range(3):
        for j in range(2):
            a = A.detach()[i, j].clone().requires_grad_()
            r = orthonormal_rows(a, method)
            (r * weights[i, j]).sum().backward()
            torch.testing.assert_close(R[i, j].detach(), r.detach(), atol=1e-6, rtol=0)
            torch.testing.assert_close(A.grad[i, j], a.grad, atol=1e-5, rtol=1e-5)


def _torch_parametrized_rotation(d: int, r: int, perturbation: float) -> nn.Module:
    """The module pyreft builds: a d×r weight under torch's orthogonal parametrization (Householder + base),
    moved off its starting point so that the reflectors are not trivial."""
    module = nn.Linear(r, d, bias=False)  # weight [d, r]
    nn.init.orthogonal_(module.weight)
    nn.utils.parametrizations.orthogonal(module)
    with torch.no_grad():
        module.parametrizations.weight.original.add_(perturbation * torch.randn(d, r).tril(-1))
    return module


@pytest.mark.parametrize("d, r", [(10, 1), (37, 3), (100, 8)])
def test_householder_matches_torch_parametrization_value_and_gradient(d, r):
    module = _torch_parametrized_rotation(d, r, perturbation=0.5)
    ours = HouseholderOrthogonal.from_pyreft(module)
    grad_weight = torch.randn(d, r)
    (module.weight * grad_weight).sum().backward()
    R = ours()
    (R * grad_weight.mT).sum().backward()
    torch.testing.assert_close(R.mT, module.weight.detach(), atol=2e-6, rtol=0)
    torch.testing.assert_close(ours.original.grad, module.parametrizations.weight.original.grad, atol=2e-5, rtol=1e-4)
    assert _orthonormality_error(R) < 1e-5
    # The functional form without a base is torch's map with use_trivialization=False.
    plain = nn.Linear(r, d, bias=False)
    nn.utils.parametrizations.orthogonal(plain, use_trivialization=False)
    with torch.no_grad():
        plain.parametrizations.weight.original.add_(0.5 * torch.randn(d, r).tril(-1))
    torch.testing.assert_close(orthonormal_rows(plain.parametrizations.weight.original.detach().mT, "householder"),
                               plain.weight.detach().mT, atol=2e-6, rtol=0)


def test_householder_batched_from_several_layers_matches_each():
    modules = [_torch_parametrized_rotation(24, 4, perturbation=0.3) for _ in range(3)]
    ours = HouseholderOrthogonal.from_pyreft(modules)
    assert ours.original.shape == (3, 24, 4) and ours.base.shape == (3, 24, 24)
    weights = torch.randn(3, 4, 24)
    (ours() * weights).sum().backward()
    for i, module in enumerate(modules):
        (module.weight * weights[i].mT).sum().backward()
        torch.testing.assert_close(ours()[i].detach(), module.weight.detach().mT, atol=2e-6, rtol=0)
        torch.testing.assert_close(ours.original.grad[i], module.parametrizations.weight.original.grad,
                                   atol=2e-5, rtol=1e-4)


def test_householder_sign_survives_a_decayed_diagonal_where_torch_zeroes_the_column():
    # torch casts the diagonal of `original` to int: a sign decayed to −0.9 becomes 0 and zeroes its column. Ours
    # reads the sign (a deliberate difference): the column stays, and equals torch's once the entry is −1 again.
    module = _torch_parametrized_rotation(12, 3, perturbation=0.2)
    with torch.no_grad():
        module.parametrizations.weight.original[1, 1] = -0.9
    ours = HouseholderOrthogonal.from_pyreft(module)
    assert module.weight[:, 1].abs().max() == 0
    assert _orthonormality_error(ours()) < 1e-5
    with torch.no_grad():
        module.parametrizations.weight.original[1, 1] = -1.0
    torch.testing.assert_close(ours().mT, module.weight.detach(), atol=2e-6, rtol=0)


def test_householder_rotation_stays_orthonormal_under_adamw_weight_decay():
    # One AdamW step with weight decay leaves the diagonal at −(1 − lr·wd); read as an integer that is 0 and R = 0.
    layer = HouseholderOrthogonal(3, 16, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        (layer() * torch.randn(3, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.original.diagonal().max() > -1.0  # the decay did reach the signs
    assert _orthonormality_error(layer()) < 1e-5


def test_pyreft_loreft_rotate_layer_imports_exactly():
    interventions = pytest.importorskip("pyreft.interventions")
    torch.manual_seed(0)
    loreft = interventions.LoreftIntervention(embed_dim=16, low_rank_dimension=3, dtype=torch.float32)
    ours = HouseholderOrthogonal.from_pyreft(loreft)  # through .rotate_layer
    torch.testing.assert_close(ours().mT, loreft.rotate_layer.weight.detach(), atol=2e-6, rtol=0)


def _explicit_base(reflectors: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The d×d matrix a compact base stands for, formed independently (float64): torch's householder_product of the
    reflectors padded to d columns (τ = 0 reflects nothing), times diag(sign(diag(reflectors)), 1, …, 1)."""
    *batch, d, r = reflectors.shape
    padded = torch.cat([reflectors.double(), reflectors.new_zeros(*batch, d, d - r, dtype=torch.float64)], dim=-1)
    full = torch.linalg.householder_product(padded, torch.cat([tau.double(), tau.new_zeros(*batch, d - r,
                                                                                             dtype=torch.float64)], -1))
    signs = torch.cat([reflectors.diagonal(dim1=-2, dim2=-1).sign().double(),
                       torch.ones(*batch, d - r, dtype=torch.float64)], dim=-1)
    return full * signs.unsqueeze(-2)


@pytest.mark.parametrize("d, r", [(10, 1), (37, 3), (100, 8), (6, 6)])
def test_compact_base_completes_the_start_and_gives_the_explicit_bases_map(d, r):
    layer = HouseholderOrthogonal(r, d, n=3, generator=torch.Generator().manual_seed(3))
    start = random_orthonormal_rows(r, d, n=3, generator=torch.Generator().manual_seed(3))
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == \
        {"original": (3, d, r), "base_reflectors": (3, d, r), "base_tau": (3, r)}  # O(d·r), no d×d state
    base = _explicit_base(layer.base_reflectors, layer.base_tau)
    torch.testing.assert_close(base.mT @ base, torch.eye(d, dtype=torch.float64).expand(3, d, d), atol=1e-6, rtol=0)
    torch.testing.assert_close(base[..., :r], start.mT.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(), start, atol=2e-6, rtol=0)  # R starts at the random start, as before
    with torch.no_grad():
        layer.original.add_(0.5 * torch.randn(3, d, r).tril(-1))
    explicit = layer.original.detach().clone().requires_grad_()
    grad_R = torch.randn(3, r, d)
    R = layer()
    (R * grad_R).sum().backward()
    R_explicit = householder_rows(explicit, base.float())
    (R_explicit * grad_R).sum().backward()
    torch.testing.assert_close(R, R_explicit, atol=2e-6, rtol=0)
    torch.testing.assert_close(layer.original.grad, explicit.grad, atol=2e-5, rtol=1e-4)
    assert _orthonormality_error(R) < 1e-5
    if d * r > 120:
        return  # finite differences cost O((d·r)²): the small shapes check them
    # The gradient through torch.ormqr is exact (float64 finite differences).
    original64 = layer.original.detach().double()[0].requires_grad_()
    reflectors64, tau64 = layer.base_reflectors[0].double(), layer.base_tau[0].double()
    assert torch.autograd.gradcheck(lambda o: householder_rows(o, reflectors64, tau64), (original64,))


@pytest.mark.parametrize("d, r, k", [(37, 3, 3), (100, 8, 8), (6, 6, 2)])
def test_the_matmul_form_of_a_compact_base_is_ormqr_and_the_explicit_base(d, r, k):
    """What the GPU runs (``_compact_wy_times``: batched products, where CUDA's ormqr loops over the batch on the host)
    against torch.ormqr and the independently formed explicit base, float64, output and gradient; one reflector with
    τ = 0 (the identity, as LAPACK reads it) in the second matrix."""
    from reft_fast.core.orthogonal import _compact_wy_times

    generator = torch.Generator().manual_seed(11)
    reflectors, tau = torch.geqrf(torch.randn(3, d, r, generator=generator, dtype=torch.float64))
    tau = tau.clone()
    tau[1, r // 2] = 0.0
    M = torch.randn(3, d, k, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, d, k, generator=generator, dtype=torch.float64)
    ours = _compact_wy_times(reflectors, tau, M)
    theirs = torch.ormqr(reflectors, tau, M)
    explicit = torch.linalg.householder_product(
        torch.cat([reflectors, reflectors.new_zeros(3, d, d - r)], -1), torch.cat([tau, tau.new_zeros(3, d - r)], -1))
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours, explicit @ M.detach(), atol=1e-12, rtol=0)
    (ours_grad,) = torch.autograd.grad(ours, M, grad)
    (their_grad,) = torch.autograd.grad(theirs, M, grad)
    torch.testing.assert_close(ours_grad, their_grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours_grad, explicit.mT @ grad, atol=1e-12, rtol=0)


def test_a_state_of_either_base_form_loads_into_a_layer_of_either_form():
    compact = HouseholderOrthogonal(3, 20, n=2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        compact.original.add_(0.3 * torch.randn(2, 20, 3).tril(-1))
    explicit_state = {"original": compact.original.detach(),
                      "base": _explicit_base(compact.base_reflectors, compact.base_tau).float()}
    layer = HouseholderOrthogonal(3, 20, n=2)
    layer.load_state_dict(explicit_state)  # pyreft's form, or a reft-fast directory saved before compact bases
    assert layer.has_explicit_base and sorted(layer.state_dict()) == ["base", "original"]
    torch.testing.assert_close(layer(), compact(), atol=2e-6, rtol=0)
    layer.load_state_dict(compact.state_dict())
    assert not layer.has_explicit_base and torch.equal(layer(), compact())
    with pytest.raises(RuntimeError, match="size mismatch for base"):
        layer.load_state_dict({"original": compact.original.detach(), "base": torch.eye(20)})


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


# Ops that make the host wait for a CUDA device: reading a value, sizing an output by the data, linalg error checks.
_SYNCING_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal",
                "aten::masked_select", "aten::_linalg_check_errors", "aten::_linalg_eigh", "aten::linalg_eigh"}


def test_compute_rotations_mixes_base_forms_without_copying_bases_or_syncing():
    d, r = 64, 4
    layers = [HouseholderOrthogonal(r, d, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for layer in layers[2:]:  # two with pyreft's explicit form
        layer.load_state_dict({"original": layer.original.detach(),
                               "base": _explicit_base(layer.base_reflectors, layer.base_tau).float()})
    with torch.no_grad():
        for layer in layers:
            layer.original.add_(0.3 * torch.randn(d, r).tril(-1))
    grad_R = torch.randn(4, r, d)
    saved, recorder = [], _OpRecorder()

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), recorder:
        R = torch.stack(compute_rotations("householder", [layer.rotation_inputs() for layer in layers]))
        (R * grad_R).sum().backward()
    assert not recorder.names & _SYNCING_OPS
    # Only O(n·d·r) tensors are saved for the backward, besides the explicit bases themselves, read in place.
    bases = {layer.base.untyped_storage().data_ptr() for layer in layers[2:]}
    large = [t for t in saved if t.numel() > 4 * d * r]
    assert large and all(t.untyped_storage().data_ptr() in bases for t in large)
    for i, layer in enumerate(layers):
        original = layer.original.detach().clone().requires_grad_()
        alone = householder_rows(original, *layer.rotation_inputs()[1:])
        (alone * grad_R[i]).sum().backward()
        torch.testing.assert_close(R[i].detach(), alone.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.original.grad, original.grad, atol=1e-5, rtol=1e-5)


def test_from_rotate_weights_starts_at_the_weights_and_stays_orthonormal():
    weights = random_orthonormal_rows(3, 20, n=2).mT  # pyreft's saved layout: [d, r], orthonormal columns
    layer = HouseholderOrthogonal.from_rotate_weights(weights)
    assert not layer.has_explicit_base
    torch.testing.assert_close(layer(), weights.mT, atol=2e-6, rtol=0)
    with torch.no_grad():
        layer.original.add_(0.5 * torch.randn(2, 20, 3).tril(-1))
    assert _orthonormality_error(layer()) < 1e-5
    single = HouseholderOrthogonal.from_rotate_weights(weights[0])
    assert single().shape == (3, 20)
    with pytest.raises(ValueError, match="orthonormal columns"):
        HouseholderOrthogonal.from_rotate_weights(2 * weights)


def test_householder_module_init_state_dict_round_trip():
    generator = torch.Generator().manual_seed(7)
    layer = HouseholderOrthogonal(4, 30, n=5, generator=generator)
    R = layer()
    assert R.shape == (5, 4, 30) and _orthonormality_error(R) < 1e-5
    assert sorted(layer.state_dict()) == ["base_reflectors", "base_tau", "original"]
    other = HouseholderOrthogonal(4, 30, n=5)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(), R, atol=0, rtol=0)
    again = HouseholderOrthogonal(4, 30, n=5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again(), R, atol=0, rtol=0)


def test_random_orthonormal_rows_shapes_dtype_and_reproducibility():
    R = random_orthonormal_rows(3, 11, generator=torch.Generator().manual_seed(1))
    assert R.shape == (3, 11) and R.dtype == torch.float32 and _orthonormality_error(R) < 1e-6
    again = random_orthonormal_rows(3, 11, generator=torch.Generator().manual_seed(1))
    assert torch.equal(R, again)
    batch = random_orthonormal_rows(2, 2, n=4, dtype=torch.float64)
    assert batch.shape == (4, 2, 2) and batch.dtype == torch.float64
    # Haar: the mean of many random rows is near zero (a fixed sign convention bug would bias it).
    many = random_orthonormal_rows(1, 3, n=4000, generator=torch.Generator().manual_seed(2))
    assert many.mean(dim=0).abs().max() < 0.05


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="float32"):
        orthonormal_rows(torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float32"):
        orthonormal_rows(torch.randn(2, 8).half(), "cholesky")
    with pytest.raises(TypeError, match="torch.Tensor"):
        orthonormal_rows([[1.0, 0.0]])
    with pytest.raises(ValueError, match="rank 9 > hidden size 8"):
        orthonormal_rows(torch.randn(9, 8))
    with pytest.raises(ValueError, match=r"\[..., rank, hidden\]"):
        orthonormal_rows(torch.randn(8))
    with pytest.raises(ValueError, match="unknown method 'qr'"):
        orthonormal_rows(torch.randn(2, 8), "qr")
    with pytest.raises(TypeError, match="float32"):
        householder_rows(torch.randn(8, 2, dtype=torch.float16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        orthonormal_rows([[1.0, 0.0]], "householder")
    with pytest.raises(ValueError, match=r"base \(explicit, d×d\) must be .* \[8, 8\]"):
        householder_rows(torch.randn(8, 2), torch.eye(7))
    with pytest.raises(ValueError, match=r"base_tau must be .* \[2\]"):
        householder_rows(torch.randn(8, 2), torch.randn(8, 2), torch.randn(3))
    with pytest.raises(ValueError, match="r=5 > d=4"):
        random_orthonormal_rows(5, 4)
    with pytest.raises(ValueError, match="n must be"):
        random_orthonormal_rows(2, 4, n=0)
    with pytest.raises(TypeError, match="dtype"):
        random_orthonormal_rows(2, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="orthogonal parametrization"):
        HouseholderOrthogonal.from_pyreft(nn.Linear(3, 8))
    with pytest.raises(ValueError, match="same"):
        HouseholderOrthogonal.from_pyreft([_torch_parametrized_rotation(8, 2, 0.1),
                                           _torch_parametrized_rotation(9, 2, 0.1)])


@pytest.mark.cuda
def test_cuda_matches_cpu_and_cholesky_never_synchronizes():
    A = _well_conditioned(8, 4096, n=32)
    for method in METHODS:
        torch.testing.assert_close(orthonormal_rows(A.cuda(), method).cpu(), orthonormal_rows(A, method),
                                   atol=1e-5, rtol=0)
    A_cuda = A.cuda().requires_grad_()
    grad_R = torch.randn_like(A_cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronization raises
    try:
        orthonormal_rows(A_cuda, "cholesky").backward(grad_R)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(A_cuda.grad).all()
