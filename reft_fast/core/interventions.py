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

Each class is a named ``InterventionSpec`` (basis rotation | free, source linear | constant, subtract yes | no) of one
implementation, ``ReftIntervention``; its parameters, its options, its name for ReftConfig and the YAML, and the
pyreft loader's mapping all follow from the spec. A new member is one more spec: a subclass with ``spec=...`` or
``register_intervention(name, spec)``.

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
* ``dropout`` and ``act_fn`` are kept as ``dropout_rate`` and ``act_fn_name``; under pyreft's names the module holds
  callables (an ``nn.Dropout`` and the activation function), which a forward copied from pyreft calls.
* NodiReFT's ``add_bias`` is recorded but creates no parameter: pyreft creates a W2 bias and never uses it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Mapping, Optional

import torch
from torch import nn

from reft_fast import ops
from reft_fast.core.dtypes import torch_dtype
from reft_fast.core.orthogonal import METHODS, HouseholderOrthogonal, batched_householder_rows, orthonormal_rows, \
    random_orthonormal_rows

__all__ = [
    "InterventionSpec",
    "ReftIntervention",
    "LoreftIntervention",
    "NoreftIntervention",
    "DireftIntervention",
    "NodireftIntervention",
    "ConsreftIntervention",
    "LobireftIntervention",
    "INTERVENTION_TYPES",
    "OPTION_KEYS",
    "register_intervention",
    "intervention_class",
    "intervention_from_config",
    "compute_rotations",
]


@dataclass(frozen=True)
class InterventionSpec:
    """How one member of the family parameterizes ``ops.low_rank_edit``: out = h + (act(z) − s·P h) Q at each row.

    Which parameters exist follows from the spec, with pyreft's names:

    ``basis="rotation"``  Q = P = R, orthonormal rows: ``rotation`` [r, d] (``rotate_layer`` with householder);
                          the constructor takes ``orthogonalization``.
    ``basis="free"``      Q = P = W2, unconstrained: ``proj_layer`` (nn.Linear d → r); the constructor takes
                          ``add_bias``, which adds ``proj_layer.bias`` b2 (subtracted with W2 h) when ``subtract``.
    ``source="linear"``   z = W h + b: ``learned_source`` (nn.Linear d → r), any activation.
    ``source="constant"`` z = b: ``learned_source`` [r] (uniform [0, 1) at init, as pyreft), no activation.
    ``subtract``          s = 1: the edit replaces the projection P h by the source; s = 0: it adds the source.
    ``pyreft_state_keys`` pyreft's state_dict key → ours, where they differ (``reft_fast.compat.pyreft``).
    """

    basis: str
    source: str
    subtract: bool
    pyreft_state_keys: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.basis not in BASIS_OPTIONS:
            raise ValueError(f"basis must be one of {list(BASIS_OPTIONS)}, got {self.basis!r}")
        if self.source not in ("linear", "constant"):
            raise ValueError(f"source must be 'linear' or 'constant', got {self.source!r}")
        if not isinstance(self.subtract, bool):
            raise TypeError(f"subtract must be a bool, got {type(self.subtract).__name__}")
        object.__setattr__(self, "pyreft_state_keys", MappingProxyType(dict(self.pyreft_state_keys)))

    @property
    def option(self) -> str:
        """The constructor argument this basis adds to the common ones (``COMMON_OPTIONS``)."""
        return BASIS_OPTIONS[self.basis]


# The hyperparameters every member takes besides embed_dim and low_rank_dimension, and the one its basis adds.
COMMON_OPTIONS = ("dropout", "act_fn", "dtype")
BASIS_OPTIONS = {"rotation": "orthogonalization", "free": "add_bias"}
OPTION_KEYS = COMMON_OPTIONS + tuple(BASIS_OPTIONS.values())


def _short_name(class_name: str) -> str:
    return class_name.lower().removesuffix("intervention")


# Every registered member by class name (pyreft's names, and any added with ``register_intervention``).
INTERVENTION_TYPES: dict[str, type] = {}


class ReftIntervention(nn.Module):
    """The one implementation of the family; a member is a subclass naming its ``InterventionSpec``::

        class LoreftIntervention(ReftIntervention, spec=InterventionSpec("rotation", "linear", subtract=True)):
            \"\"\"LoReFT: h + (act(W h + b) − R h) R.\"\"\"

    which registers it by name for ``intervention_class`` (and so for ReftConfig, saved models and the training
    YAML). ``register_intervention`` does the same at run time.
    """

    spec: ClassVar[Optional[InterventionSpec]] = None
    uses_rotation: ClassVar[bool] = False  # derived from spec.basis, read by the model layer and the pyreft loader
    has_activation: ClassVar[bool] = True
    has_add_bias: ClassVar[bool] = False

    def __init_subclass__(cls, *, spec: Optional[InterventionSpec] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if spec is None:
            return  # a subclass of a member keeps its spec and is not registered under a name of its own
        if not isinstance(spec, InterventionSpec):
            raise TypeError(f"spec must be an InterventionSpec, got {type(spec).__name__}")
        if cls.__name__ in INTERVENTION_TYPES:
            raise ValueError(f"an intervention type named {cls.__name__!r} is already registered")
        # Names are looked up by their short form too ("loreft" in a config): two members with one short form would
        # make that name resolve to whichever was registered last.
        clash = [name for name in INTERVENTION_TYPES if _short_name(name) == _short_name(cls.__name__)]
        if clash:
            raise ValueError(f"an intervention type named {cls.__name__!r} would share the short name "
                             f"{_short_name(cls.__name__)!r} of the registered {clash[0]!r}; choose another name")
        cls.spec = spec
        cls.uses_rotation = spec.basis == "rotation"
        cls.has_activation = spec.source == "linear"
        cls.has_add_bias = spec.basis == "free"
        INTERVENTION_TYPES[cls.__name__] = cls

    def __init__(self, *, embed_dim: int, low_rank_dimension: int, dropout: float = 0.0, act_fn: Optional[str] = None,
                 dtype=torch.float32, add_bias: Optional[bool] = None, orthogonalization: Optional[str] = None,
                 device=None, init_orth: bool = True):
        super().__init__()
        spec = type(self).spec
        if init_orth is not True:  # pyvene's keyword; pyreft accepts it and always starts R orthonormal all the same
            raise ValueError(f"init_orth={init_orth!r} is not supported: a rotation always starts orthonormal (pyreft "
                             "ignores init_orth and does the same); leave it out")
        if spec is None:
            raise TypeError("ReftIntervention is the family's implementation: instantiate a member "
                            "(LoreftIntervention, ...) or register one with register_intervention")
        if orthogonalization is not None and spec.basis != "rotation":
            raise TypeError(f"{type(self).__name__} got an unexpected keyword argument 'orthogonalization' (its "
                            f"{spec.basis} basis has no rotation; it takes {spec.option!r})")
        add_bias = False if add_bias is None else add_bias
        orthogonalization = "householder" if orthogonalization is None else orthogonalization
        _check_arguments(embed_dim, low_rank_dimension, dropout, act_fn, add_bias, orthogonalization)
        # pyreft's scripts pass one set of arguments to every type (examples/loreft/train.py: dropout, dtype, act_fn,
        # device, add_bias) and its constructors ignore what a type does not use; so do these. The YAML path refuses
        # an act_fn on a constant source itself (reft_fast.train.train_config).
        if spec.basis != "free":
            add_bias = False
        if spec.source == "constant":
            act_fn = None
        self.embed_dim = embed_dim
        self.low_rank_dimension = low_rank_dimension
        self.dropout_rate = float(dropout)
        self.act_fn_name = act_fn
        # pyreft's names for the same hyperparameters, as callables: a forward copied from pyreft calls
        # self.act_fn(x) and self.dropout(x). The edit itself reads dropout_rate and act_fn_name.
        self.act_fn = _ACTIVATION_FUNCTIONS[ops.ACTIVATIONS[act_fn]]
        self.dropout = nn.Dropout(self.dropout_rate)
        self.dtype = torch_dtype(dtype)
        self.add_bias = add_bias
        self.orthogonalization = orthogonalization
        self._create_parameters(spec)
        if device is not None:
            # Drawn on the CPU first, as pyreft does, so that one seed gives pyreft's initial values on any device.
            self.to(torch.device(device))

    def _create_parameters(self, spec: InterventionSpec) -> None:
        embed_dim, low_rank_dimension = self.embed_dim, self.low_rank_dimension
        # Basis first, then source: the order (and so the random draws) of pyreft's constructors.
        if spec.basis == "free":
            # pyreft's NodiReFT creates a W2 bias and never uses it; one is made only where the edit subtracts it.
            self.proj_layer = nn.Linear(embed_dim, low_rank_dimension, bias=self.add_bias and spec.subtract)
        elif self.orthogonalization == "householder":
            self.rotate_layer = HouseholderOrthogonal(low_rank_dimension, embed_dim)
        else:
            self.rotation = nn.Parameter(random_orthonormal_rows(low_rank_dimension, embed_dim))
        if spec.source == "linear":
            # nn.Linear's default init, as pyreft (which then casts it to its dtype argument); kept in fp32 here.
            self.learned_source = nn.Linear(embed_dim, low_rank_dimension)
        else:
            self.learned_source = nn.Parameter(torch.rand(low_rank_dimension))  # pyreft's init: uniform [0, 1)

    # ----------------------------------------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        """Every hyperparameter, JSON-ready: enough to rebuild the module (``intervention_from_config``)."""
        config = {"type": type(self).__name__, "embed_dim": self.embed_dim,
                  "low_rank_dimension": self.low_rank_dimension, "dropout": self.dropout_rate,
                  "act_fn": self.act_fn_name,
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
        """The tensors R is computed from: (A,) for polar/cholesky; for householder (original, base_reflectors,
        base_tau), or (original, base) with pyreft's explicit base (``HouseholderOrthogonal``)."""
        if self.orthogonalization == "householder":
            return self.rotate_layer.rotation_inputs()
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
        return self.dropout_rate if self.training else 0.0

    def edit(self, h: torch.Tensor, positions: torch.Tensor, *, rotation: Optional[torch.Tensor] = None,
             seed: Optional[int] = None, backend: Optional[str] = None, validate: bool = True,
             in_place: bool = False) -> torch.Tensor:
        """Edit the rows ``positions`` [B, P] (−1 = none) of h [B, T, d]; every other row is returned unchanged.

        ``rotation`` is this intervention's R when the caller computed it (a ReftModel does, for all interventions
        at once); ``seed`` keys the dropout mask (a ReftModel draws one per forward so that a recomputation under
        gradient checkpointing draws the same mask). ``in_place``: the caller owns h, write into it where the backend
        can (``ops.low_rank_edit``); use the return value.

        A ReftModel's hooks do not call this method: they apply what ``prepare`` built once per forward (from
        ``edit_steps``). A subclass changes the fused edit through ``edit_steps``, or replaces it with a ``forward``
        of its own (pyvene's way, run by ``hooks.edit_with_own_forward``).
        """
        return apply_prepared(h, positions, self.prepare(rotation, seed), backend=backend, validate=validate,
                              in_place=in_place)

    def prepare(self, rotation: Optional[torch.Tensor] = None, seed: Optional[int] = None) -> tuple:
        """The edit as ``apply_prepared`` takes it: the op calls of ``edit_steps``, each checked and bound once
        (``ops.prepare_edit``), the dropout (keyed by ``seed``) on the last. A ReftModel prepares every intervention
        once per forward; its hooks apply them."""
        steps = self.edit_steps(rotation)
        last = len(steps) - 1
        p = self._dropout_p()
        return tuple(ops.prepare_edit(**step, dropout=p if k == last else 0.0, seed=seed if k == last else None)
                     for k, step in enumerate(steps))

    def edit_steps(self, rotation: Optional[torch.Tensor] = None) -> tuple[dict, ...]:
        """The op calls this intervention's edit is made of, in order, as ``ops.low_rank_edit`` keyword arguments
        (Q, W, b, P, act; dropout applies to the last): one, or two for a subtracted W2 bias under an activation."""
        spec = type(self).spec
        if spec.basis == "free":
            Q, projection_bias = self.proj_layer.weight, self.proj_layer.bias
        else:
            Q, projection_bias = (self.rotation_matrix() if rotation is None else rotation), None
        W, b = (self.learned_source.weight, self.learned_source.bias) if spec.source == "linear" else \
            (None, self.learned_source)
        P = Q if spec.subtract else None
        if projection_bias is not None and ops.ACTIVATIONS[self.act_fn_name] != 0:
            return dict(Q=Q, W=W, b=b, P=P, act=self.act_fn_name), dict(Q=Q, b=-projection_bias)
        if projection_bias is not None:  # without an activation b2 folds into the source bias: z − b2 = W h + (b − b2)
            b = b - projection_bias
        return (dict(Q=Q, W=W, b=b, P=P, act=self.act_fn_name),)

    def forward(self, h: torch.Tensor, positions: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """``edit`` with positions defaulting to every token of every example."""
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        return self.edit(h, positions, **kwargs)


def apply_prepared(h: torch.Tensor, positions: torch.Tensor, steps: tuple, *, backend: Optional[str] = None,
                   validate: bool = True, in_place: bool = False) -> torch.Tensor:
    """Edit h at ``positions`` with a prepared edit (``ReftIntervention.prepare``): its op calls in order.

    Two calls where act(z) − b2 does not fold into the source: act(W h + b) − W2 h first, then −b2 along W2 with the
    dropout of the whole edited vector (pyreft's dropout covers the full output)."""
    edited = ops.apply_edit(h, positions, steps[0], backend=backend, validate=validate, in_place=in_place)
    for params in steps[1:]:
        # the first call's output is new (ours) or h written in place (the caller's to give): the next writes into it
        edited = ops.apply_edit(edited, positions, params, backend=backend, validate=False,
                                in_place=in_place or edited is not h)
    return edited


def _check_arguments(embed_dim, low_rank_dimension, dropout, act_fn, add_bias, orthogonalization) -> None:
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
    if orthogonalization not in METHODS:
        raise ValueError(f"orthogonalization must be one of {list(METHODS)}, got {orthogonalization!r}")
    if not isinstance(add_bias, bool):
        raise TypeError(f"add_bias must be a bool, got {type(add_bias).__name__}")


# pyreft's act_fn callables by activation code (reft_fast.ops.ACTIVATIONS); gelu is the exact (erf) one, as the op's.
def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_ACTIVATION_FUNCTIONS = {0: _identity, 1: torch.relu, 2: torch.nn.functional.gelu,
                         3: torch.nn.functional.silu, 4: torch.tanh}


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


def compute_rotations(method: str, inputs: list[tuple[torch.Tensor, ...]], *,
                      replayable: bool = True) -> list[torch.Tensor]:
    """R for several interventions of one orthogonalization method (same r, d) in one batched call.

    ``inputs`` holds each intervention's ``rotation_inputs()``. Differentiable when grad is enabled; with
    ``replayable`` also under reentrant gradient checkpointing (``_ReplayableGraph``). A caller that knows no
    reentrant recomputation will backpropagate through R passes False: autograd then differentiates the map directly,
    without the node's second autograd pass (≈ 25 µs per intervention and step on the CPU, 2026-11-30).
    """
    sizes = [len(group) for group in inputs]

    def batched(*flat):
        if method == "householder":  # regroup: compact and explicit bases take different numbers of tensors
            ends = list(itertools.accumulate(sizes))
            return batched_householder_rows([flat[end - size:end] for size, end in zip(sizes, ends)])
        return orthonormal_rows(torch.stack(flat), method)

    flat = [t for group in inputs for t in group]
    if replayable and torch.is_grad_enabled() and any(t.requires_grad for t in flat):
        stacked = _ReplayableGraph.apply(batched, *flat)
    else:
        stacked = batched(*flat)
    return list(stacked.unbind(0))


# --------------------------------------------------------------------------------------------------------------------
# The family: pyreft's classes, each a named spec
# --------------------------------------------------------------------------------------------------------------------
# pyreft's LoReFT saves learned_source's tensors without the module prefix.
_FLAT_LEARNED_SOURCE = {"weight": "learned_source.weight", "bias": "learned_source.bias"}


class LoreftIntervention(ReftIntervention, spec=InterventionSpec("rotation", "linear", subtract=True,
                                                                  pyreft_state_keys=_FLAT_LEARNED_SOURCE)):
    """LoReFT: h + (act(W h + b) − R h) R, R [r, d] with orthonormal rows."""


class NoreftIntervention(ReftIntervention, spec=InterventionSpec("free", "linear", subtract=True)):
    """NoReFT: h + (act(W1 h + b1) − (W2 h + b2)) W2, no orthogonality; b2 only with ``add_bias=True``."""


class DireftIntervention(ReftIntervention, spec=InterventionSpec("rotation", "linear", subtract=False)):
    """DiReFT (pyreft's): h + act(W h + b) R, R with orthonormal rows, nothing subtracted."""


class NodireftIntervention(ReftIntervention, spec=InterventionSpec("free", "linear", subtract=False)):
    """NodiReFT (the paper's DiReFT): h + act(W1 h + b1) W2."""


class ConsreftIntervention(ReftIntervention, spec=InterventionSpec("rotation", "constant", subtract=True)):
    """ConsReFT: h + (b − R h) R, a constant target inside the subspace."""


class LobireftIntervention(ReftIntervention, spec=InterventionSpec("rotation", "constant", subtract=False)):
    """LobiReFT: h + b R, a learned bias along R."""


def register_intervention(name: str, spec: InterventionSpec, doc: Optional[str] = None) -> type:
    """Add a member to the family at run time: the class ``name``, built from ReftConfig, saved and loaded by name."""
    if not name.isidentifier():
        raise ValueError(f"an intervention type's name must be a Python identifier, got {name!r}")
    namespace = {"__doc__": doc or f"{name}: basis {spec.basis}, source {spec.source}, subtract {spec.subtract}",
                 "__module__": __name__}
    return type(name, (ReftIntervention,), namespace, spec=spec)


def intervention_class(name) -> type:
    """``"LoreftIntervention"``, ``"loreft"``, ``"LoReFT"`` or the class itself → the class."""
    if isinstance(name, type) and issubclass(name, ReftIntervention):
        return name
    if isinstance(name, str):
        key = name.rsplit(".", 1)[-1].strip("'<>")  # also pyvene's saved "<class 'pyreft.interventions.X'>"
        by_short_name = {_short_name(known): cls for known, cls in INTERVENTION_TYPES.items()}
        cls = INTERVENTION_TYPES.get(key) or by_short_name.get(_short_name(key))
        if cls is not None:
            return cls
    raise ValueError(f"unknown intervention type {name!r}; expected one of {sorted(INTERVENTION_TYPES)} "
                     f"(or {sorted(map(_short_name, INTERVENTION_TYPES))})")


def intervention_from_config(config: dict) -> ReftIntervention:
    """Rebuild an intervention from its ``config_dict()`` (fresh parameters)."""
    config = dict(config)
    cls = intervention_class(config.pop("type"))
    return cls(**config)
