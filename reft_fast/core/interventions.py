"""The LoReFT family as modules with pyreft's names and arguments; every edit runs through ``reft_fast.ops``.

=====================  ==========================================  =====================================
class                  edit of a selected hidden state h            parameters (all float32)
=====================  ==========================================  =====================================
LoreftIntervention     h + (act(W h + b) − R h) R                   rotation A → R, learned_source (W, b)
NoreftIntervention     h + (act(W1 h + b1) − W2 h [− b2]) W2        learned_source (W1, b1), proj_layer (W2[, b2])
DireftIntervention     h + act(W h + b) R                           rotation A → R, learned_source (W, b)
NodireftIntervention   h + act(W1 h + b1) W2                        learned_source (W1, b1), proj_layer (W2)
ConsreftIntervention   h + (b − R h) R                              rotation A → R, learned_source (b)
LobireftIntervention   h + b R                                      rotation A → R, learned_source (b)
=====================  ==========================================  =====================================

R [r, d] has orthonormal rows (pyreft stores its transpose, a d×r weight with orthonormal columns). It is computed from
an unconstrained parameter by ``reft_fast.core.orthogonal``: ``orthogonalization="householder"`` (default) keeps pyreft's
own parametrization (torch's orthogonal parametrization with a trivialization base) so that training follows pyreft step
for step; ``"polar"`` or ``"cholesky"`` keep ``rotation`` [r, d] and map it with ``orthonormal_rows``. A ReftModel
computes R for all its interventions in one batched call per forward and passes it to :meth:`edit`; called alone, an
intervention computes its own.

Differences from pyreft, on purpose:
* Parameters are float32 whatever the base model's dtype (the op computes in fp32 and casts at the boundary).
  ``dtype`` is accepted for pyreft compatibility and saved, but does not change the parameters; in pyreft it sets the
  dtype of W and b (bf16 by default), which makes an fp32 base crash unless it is passed.
* ConsReFT applies ``dropout`` when given one (pyreft accepts and ignores it).
* NodiReFT's ``add_bias`` is recorded but creates no parameter: pyreft creates a W2 bias and never uses it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from reft_fast import ops
from reft_fast.core.dtypes import torch_dtype
from reft_fast.core.orthogonal import METHODS, HouseholderOrthogonal, householder_rows, orthonormal_rows, \
    random_orthonormal_rows

__all__ = [
    "ReftIntervention",
    "LoreftIntervention",
    "NoreftIntervention",
    "DireftIntervention",
    "NodireftIntervention",
    "ConsreftIntervention",
    "LobireftIntervention",
    "INTERVENTION_TYPES",
    "intervention_class",
    "intervention_from_config",
    "compute_rotations",
]

class ReftIntervention(nn.Module):
    """Base class: argument checks, configuration, and the R (rotation) machinery shared by the rotation members."""

    uses_rotation = False
    has_activation = True
    has_add_bias = False

    def __init__(self, *, embed_dim: int, low_rank_dimension: int, dropout: float = 0.0, act_fn: Optional[str] = None,
                 dtype=torch.float32, add_bias: bool = False, orthogonalization: str = "householder"):
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int (the model's hidden size), got {embed_dim!r}")
        if isinstance(low_rank_dimension, bool) or not isinstance(low_rank_dimension, int) or low_rank_dimension < 1:
            raise ValueError(f"low_rank_dimension must be a positive int, got {low_rank_dimension!r}")
        if low_rank_dimension > embed_dim:
            raise ValueError(f"low_rank_dimension {low_rank_dimension} is larger than embed_dim {embed_dim}: the "
                             "rank of the edit is at most the hidden size")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if act_fn not in ops.ACTIVATIONS:
            raise ValueError(f"act_fn must be None or one of {sorted(k for k in ops.ACTIVATIONS if k)}, got {act_fn!r}")
        if not self.has_activation and ops.ACTIVATIONS[act_fn] != 0:
            raise ValueError(f"{type(self).__name__} has no activation (its source is the constant b), got "
                             f"act_fn={act_fn!r}")
        if orthogonalization not in METHODS:
            raise ValueError(f"orthogonalization must be one of {list(METHODS)}, got {orthogonalization!r}")
        if not isinstance(add_bias, bool):
            raise TypeError(f"add_bias must be a bool, got {type(add_bias).__name__}")
        self.embed_dim = embed_dim
        self.low_rank_dimension = low_rank_dimension
        self.dropout = float(dropout)
        self.act_fn = act_fn
        self.dtype = torch_dtype(dtype)
        self.add_bias = add_bias
        self.orthogonalization = orthogonalization
        if self.uses_rotation:
            if orthogonalization == "householder":
                self.rotate_layer = HouseholderOrthogonal(low_rank_dimension, embed_dim)
            else:
                self.rotation = nn.Parameter(random_orthonormal_rows(low_rank_dimension, embed_dim))

    # ----------------------------------------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        """Every hyperparameter, JSON-ready: enough to rebuild the module (``intervention_from_config``)."""
        config = {"type": type(self).__name__, "embed_dim": self.embed_dim,
                  "low_rank_dimension": self.low_rank_dimension, "dropout": self.dropout, "act_fn": self.act_fn,
                  "dtype": str(self.dtype).removeprefix("torch.")}
        if self.has_add_bias:
            config["add_bias"] = self.add_bias
        if self.uses_rotation:
            config["orthogonalization"] = self.orthogonalization
        return config

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config_dict().items() if k != "type")

    # ----------------------------------------------------------------------------------------------------------------
    def rotation_inputs(self) -> tuple[torch.Tensor, ...]:
        """The tensors R is computed from: (A,) for polar/cholesky, (original, base) for householder."""
        if self.orthogonalization == "householder":
            return self.rotate_layer.original, self.rotate_layer.base
        return (self.rotation,)

    def rotation_matrix(self) -> torch.Tensor:
        """R [r, d] with orthonormal rows, computed from this intervention's parameters alone."""
        return compute_rotations(self.orthogonalization, [self.rotation_inputs()])[0]

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() cast the base; the interventions stay fp32 (the op requires it).
        super()._apply(fn, recurse)
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        return self

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def edit(self, h: torch.Tensor, positions: torch.Tensor, *, rotation: Optional[torch.Tensor] = None,
             seed: Optional[int] = None, backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
        """Edit the rows ``positions`` [B, P] (−1 = none) of h [B, T, d]; every other row is returned unchanged.

        ``rotation`` is this intervention's R when the caller computed it (a ReftModel does, for all interventions
        at once); ``seed`` keys the dropout mask (a ReftModel draws one per forward so that a recomputation under
        gradient checkpointing draws the same mask).
        """
        raise NotImplementedError

    def forward(self, h: torch.Tensor, positions: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """``edit`` with positions defaulting to every token of every example."""
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        return self.edit(h, positions, **kwargs)


class _ReplayableGraph(torch.autograd.Function):
    """``fn(*inputs)`` whose backward may run any number of times (once per checkpoint recomputation).

    R is computed once per forward and used by hooks inside checkpointed layers. Under reentrant checkpointing each
    recomputed layer runs its own inner backward, which reaches R's producer again; an ordinary graph has freed its
    saved tensors after the first pass ("backward through the graph a second time"). This node keeps the small graph
    of fn (an r×d map per intervention) alive and replays it with retain_graph on every call; the contributions add up
    in the parameters' .grad as usual. Without checkpointing autograd sums all uses of R first and this runs once.
    """

    @staticmethod
    def forward(ctx, fn, *inputs):
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
            out = fn(*leaves)
        ctx.graph = (leaves, out)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        leaves, out = ctx.graph
        wanted = [x for x in leaves if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, retain_graph=True))
        return (None, *[next(grads) if x.requires_grad else None for x in leaves])


def compute_rotations(method: str, inputs: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """R for several interventions of one orthogonalization method (same r, d) in one batched call.

    ``inputs`` holds each intervention's ``rotation_inputs()``. Differentiable (and safe under reentrant gradient
    checkpointing) when grad is enabled.
    """
    def batched(*flat):
        if method == "householder":
            return householder_rows(torch.stack(flat[0::2]), torch.stack(flat[1::2]))
        return orthonormal_rows(torch.stack(flat), method)

    flat = [t for group in inputs for t in group]
    if torch.is_grad_enabled() and any(t.requires_grad for t in flat):
        stacked = _ReplayableGraph.apply(batched, *flat)
    else:
        stacked = batched(*flat)
    return list(stacked.unbind(0))


# --------------------------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------------------------
class _LearnedSourceMixin:
    def _make_learned_source(self):
        # nn.Linear's default init, as pyreft (which then casts it to its dtype argument); kept in fp32 here.
        self.learned_source = nn.Linear(self.embed_dim, self.low_rank_dimension)


class _RotatedLearnedSourceIntervention(_LearnedSourceMixin, ReftIntervention):
    """LoReFT and DiReFT: the source act(W h + b) is written along R (orthonormal rows)."""

    uses_rotation = True
    _op = None  # ops.loreft or ops.direft

    def __init__(self, *, embed_dim: int, low_rank_dimension: int, dropout: float = 0.0, act_fn: Optional[str] = None,
                 dtype=torch.float32, orthogonalization: str = "householder"):
        super().__init__(embed_dim=embed_dim, low_rank_dimension=low_rank_dimension, dropout=dropout, act_fn=act_fn,
                         dtype=dtype, orthogonalization=orthogonalization)
        self._make_learned_source()

    def edit(self, h, positions, *, rotation=None, seed=None, backend=None, validate=True):
        R = self.rotation_matrix() if rotation is None else rotation
        return type(self)._op(h, positions, R, self.learned_source.weight, self.learned_source.bias, act=self.act_fn,
                              dropout=self._dropout_p(), seed=seed, backend=backend, validate=validate)


class LoreftIntervention(_RotatedLearnedSourceIntervention):
    """LoReFT: h + (act(W h + b) − R h) R, R [r, d] with orthonormal rows."""

    _op = staticmethod(ops.loreft)


class DireftIntervention(_RotatedLearnedSourceIntervention):
    """DiReFT (pyreft's): h + act(W h + b) R, R with orthonormal rows, nothing subtracted."""

    _op = staticmethod(ops.direft)


class NoreftIntervention(_LearnedSourceMixin, ReftIntervention):
    """NoReFT: h + (act(W1 h + b1) − (W2 h + b2)) W2, no orthogonality; b2 only with ``add_bias=True``."""

    has_add_bias = True

    def __init__(self, *, embed_dim: int, low_rank_dimension: int, dropout: float = 0.0, act_fn: Optional[str] = None,
                 dtype=torch.float32, add_bias: bool = False):
        super().__init__(embed_dim=embed_dim, low_rank_dimension=low_rank_dimension, dropout=dropout, act_fn=act_fn,
                         dtype=dtype, add_bias=add_bias)
        self.proj_layer = nn.Linear(embed_dim, low_rank_dimension, bias=add_bias)
        self._make_learned_source()

    def edit(self, h, positions, *, rotation=None, seed=None, backend=None, validate=True):
        W1, b1 = self.learned_source.weight, self.learned_source.bias
        W2, b2 = self.proj_layer.weight, self.proj_layer.bias
        p = self._dropout_p()
        if b2 is None or ops.ACTIVATIONS[self.act_fn] == 0:
            # Without an activation the projection bias folds into the source bias: act(z) − b2 = W1 h + (b1 − b2).
            bias = b1 if b2 is None else b1 - b2
            return ops.noreft(h, positions, W1, bias, W2, act=self.act_fn, dropout=p, seed=seed, backend=backend,
                              validate=validate)
        # act(z) − b2 does not fold: edit with act(W1 h + b1) − W2 h first, then add −b2 along W2 and drop out the
        # whole edited vector in that second pass (pyreft's dropout covers the full output).
        h = ops.noreft(h, positions, W1, b1, W2, act=self.act_fn, backend=backend, validate=validate)
        return ops.low_rank_edit(h, positions, W2, b=-b2, dropout=p, seed=seed, backend=backend, validate=False)


class NodireftIntervention(_LearnedSourceMixin, ReftIntervention):
    """NodiReFT (the paper's DiReFT): h + act(W1 h + b1) W2."""

    has_add_bias = True

    def __init__(self, *, embed_dim: int, low_rank_dimension: int, dropout: float = 0.0, act_fn: Optional[str] = None,
                 dtype=torch.float32, add_bias: bool = False):
        super().__init__(embed_dim=embed_dim, low_rank_dimension=low_rank_dimension, dropout=dropout, act_fn=act_fn,
                         dtype=dtype, add_bias=add_bias)
        self.proj_layer = nn.Linear(embed_dim, low_rank_dimension, bias=False)
        self._make_learned_source()

    def edit(self, h, positions, *, rotation=None, seed=None, backend=None, validate=True):
        return ops.nodireft(h, positions, self.learned_source.weight, self.learned_source.bias, self.proj_layer.weight,
                            act=self.act_fn, dropout=self._dropout_p(), seed=seed, backend=backend, validate=validate)


class _ConstantSourceIntervention(ReftIntervention):
    """ConsReFT and LobiReFT: the source is a learned constant b (no W, no activation) written along R."""

    has_activation = False
    uses_rotation = True
    _op = None  # ops.consreft or ops.lobireft

    def __init__(self, *, embed_dim: int, low_rank_dimension: int, dropout: float = 0.0, act_fn: Optional[str] = None,
                 dtype=torch.float32, orthogonalization: str = "householder"):
        super().__init__(embed_dim=embed_dim, low_rank_dimension=low_rank_dimension, dropout=dropout, act_fn=act_fn,
                         dtype=dtype, orthogonalization=orthogonalization)
        self.learned_source = nn.Parameter(torch.rand(self.low_rank_dimension))  # pyreft's init: uniform [0, 1)

    def edit(self, h, positions, *, rotation=None, seed=None, backend=None, validate=True):
        R = self.rotation_matrix() if rotation is None else rotation
        return type(self)._op(h, positions, R, self.learned_source, dropout=self._dropout_p(), seed=seed,
                              backend=backend, validate=validate)


class ConsreftIntervention(_ConstantSourceIntervention):
    """ConsReFT: h + (b − R h) R, a constant target inside the subspace."""

    _op = staticmethod(ops.consreft)


class LobireftIntervention(_ConstantSourceIntervention):
    """LobiReFT: h + b R, a learned bias along R."""

    _op = staticmethod(ops.lobireft)


INTERVENTION_TYPES = {cls.__name__: cls for cls in (LoreftIntervention, NoreftIntervention, DireftIntervention,
                                                     NodireftIntervention, ConsreftIntervention,
                                                     LobireftIntervention)}
_SHORT_NAMES = {name.removesuffix("Intervention").lower(): cls for name, cls in INTERVENTION_TYPES.items()}


def intervention_class(name) -> type:
    """``"LoreftIntervention"``, ``"loreft"``, ``"LoReFT"`` or the class itself → the class."""
    if isinstance(name, type) and issubclass(name, ReftIntervention):
        return name
    if isinstance(name, str):
        key = name.rsplit(".", 1)[-1].strip("'<>")  # also pyvene's saved "<class 'pyreft.interventions.X'>"
        cls = INTERVENTION_TYPES.get(key) or _SHORT_NAMES.get(key.lower().removesuffix("intervention"))
        if cls is not None:
            return cls
    raise ValueError(f"unknown intervention type {name!r}; expected one of {sorted(INTERVENTION_TYPES)} "
                     f"(or {sorted(_SHORT_NAMES)})")


def intervention_from_config(config: dict) -> ReftIntervention:
    """Rebuild an intervention from its ``config_dict()`` (fresh parameters)."""
    config = dict(config)
    cls = intervention_class(config.pop("type"))
    return cls(**config)
