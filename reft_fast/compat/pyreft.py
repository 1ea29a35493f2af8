"""pyreft's formats and helpers on top of reft_fast: intervention states and saved directories.

State. pyreft keeps R as a rotate layer, a d×r weight with orthonormal columns under torch's orthogonal
parametrization; ours is R [r, d] (``rotation``, or ``rotate_layer`` with ``orthogonalization="householder"``). Its
other tensors carry our names except where a type's spec says otherwise (``InterventionSpec.pyreft_state_keys``).

Directory. pyreft's ``save`` writes config.json (``representations``, ``intervention_types``, ``sorted_keys``,
``intervention_dimensions``) and one ``intkey_<key>.bin`` per intervention, read here with
``torch.load(weights_only=True)`` (no pickled code runs). pyreft does not save dropout, act_fn or add_bias: they take
their defaults, add_bias being read from the weights. With ``include_model=True`` pyreft also writes
``pytorch_model.bin``: the base's trainable parameters (a classifier head), which ``ReftModel.load(...,
include_model=True)`` reads the same way. ``ReftModel.load`` reaches this reader through
``reft_fast.core.saving.register_directory_format`` (see ``reft_fast.compat``).

Weights alone. pyvene's ``save_intervention``, with which pyreft's trainer writes every checkpoint
(``checkpoint-N/intervenable_model``), writes the intkey_*.bin files and pytorch_model.bin but no config.json;
``ReftModel.load_intervention`` reads them into an existing model's interventions of the same keys through
``reft_fast.core.saving.register_weights_format``.

Access. pyreft's scripts read ``reft_model.interventions[key][0]`` (pyvene ≤ 0.1.6 stored (intervention, hook)
pairs) and ``intervention.rotate_layer.weight`` (d×r); both work on reft_fast's interventions through the two
accessors attached to ``ReftIntervention`` at the end of this section, which leave our parameters as they are.

"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from reft_fast.core.config import ReftConfig
from reft_fast.core.interventions import ReftIntervention, intervention_class
from reft_fast.core.hf import model_hidden_size
from reft_fast.core.model import ReftModel, intervention_key
from reft_fast.core.saving import (CONFIG_NAME, ReftLoadError, check_base_parameters, check_on_meta_copy,
                                   check_same_keys, load_base_parameters, register_directory_format,
                                   register_weights_format)
from reft_fast.core.orthogonal import HouseholderOrthogonal, householder_rows

__all__ = ["load_pyreft_state", "load_pyreft_module", "load_pyreft_directory", "is_pyreft_config",
           "holds_pyreft_weights", "load_pyreft_weights_into", "pyvene_keys"]

# pyvene's save(..., include_model=True) and every checkpoint of pyreft's trainer write the base's parameters that
# require grad (a classifier head; an empty dict for a frozen base) here, never the interventions (pyvene 0.1.8).
PYREFT_BASE_NAME = "pytorch_model.bin"
# pyvene's file of one intervention's state_dict(), named by its key.
_INTKEY_PREFIX, _INTKEY_SUFFIX = "intkey_", ".bin"
_ORIGINAL_KEY = "rotate_layer.parametrizations.weight.original"
_BASE_KEY = "rotate_layer.parametrizations.weight.0.base"


# --------------------------------------------------------------------------------------------------------------------
# One intervention's state
# --------------------------------------------------------------------------------------------------------------------
def load_pyreft_state(intervention: ReftIntervention, state: dict) -> None:
    """Copy into ``intervention`` the weights of a pyreft intervention of the same type (its ``state_dict()``, as in
    intkey_*.bin)."""
    renames = type(intervention).spec.pyreft_state_keys
    # Keys of ours that pyreft lacks are an error below; pyreft's extra ones (NodiReFT's unused W2 bias) are ignored.
    state = {renames.get(key, key): value for key, value in state.items()}
    if intervention.uses_rotation:
        _load_rotation(intervention, state)
    own = {k: v for k, v in intervention.state_dict().items() if not k.startswith(("rotation", "rotate_layer"))}
    if type(intervention).spec.subtract and "proj_layer.bias" in state and "proj_layer.bias" not in own:
        raise ValueError(f"the pyreft state of {type(intervention).__name__} has the subtracted bias proj_layer.bias "
                         "(add_bias=True), which this intervention, built with add_bias=False, would drop")
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"the pyreft state of {type(intervention).__name__} lacks {missing} (has {sorted(state)})")
    with torch.no_grad():
        for key, target in own.items():
            value = state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"pyreft tensor {key!r} has shape {list(value.shape)}, expected {list(target.shape)} "
                                 f"(embed_dim {intervention.embed_dim}, rank {intervention.low_rank_dimension})")
            target.copy_(value.to(target.dtype))


def load_pyreft_module(intervention: ReftIntervention, module: nn.Module) -> None:
    """Copy into ``intervention`` a live pyreft intervention of the same type.

    Unlike its ``state_dict()`` (LoReFT's keeps only the rotation weight), the module holds the exact state of torch's
    parametrization, so with ``orthogonalization="householder"`` training continues exactly as in pyreft.
    """
    state = dict(module.state_dict())
    if intervention.uses_rotation and intervention.orthogonalization == "householder":
        exact = HouseholderOrthogonal.from_pyreft(module)
        state = {k: v for k, v in state.items() if not k.startswith("rotate_layer")}
        state[_ORIGINAL_KEY] = exact.original.detach()
        state[_BASE_KEY] = exact.base
    load_pyreft_state(intervention, state)


def _load_rotation(intervention: ReftIntervention, state: dict) -> None:
    """Consume the rotate layer's entries of ``state`` into R. LoReFT's state holds the d×r weight itself; the others
    keep torch's parametrization state (original, base)."""
    original, base, weight = state.pop(_ORIGINAL_KEY, None), state.pop(_BASE_KEY, None), state.pop("rotate_layer", None)
    shape = (intervention.embed_dim, intervention.low_rank_dimension)
    householder = intervention.orthogonalization == "householder"
    with torch.no_grad():
        if original is not None and base is not None:
            original, base = original.float().cpu(), base.float().cpu()
            if tuple(original.shape) != shape:
                raise ValueError(f"pyreft rotate layer has shape {list(original.shape)}, expected {list(shape)}")
            if householder:  # pyreft's explicit base, kept as it is so that training continues exactly as pyreft's
                intervention.rotate_layer.load_state_dict({"original": original, "base": base})
                return
            weight = householder_rows(original, base).mT
        if weight is None:
            raise ValueError(f"the pyreft state of {type(intervention).__name__} has no rotate layer (keys "
                             f"{sorted(state)})")
        weight = weight.float().cpu()
        if tuple(weight.shape) != shape:
            raise ValueError(f"pyreft rotate_layer has shape {list(weight.shape)}, expected {list(shape)}")
        if householder:
            intervention.rotate_layer.load_state_dict(HouseholderOrthogonal.from_rotate_weights(weight).state_dict())
        else:
            intervention.rotation.copy_(weight.mT)


# --------------------------------------------------------------------------------------------------------------------
# A directory saved by pyreft
# --------------------------------------------------------------------------------------------------------------------
def is_pyreft_config(config: dict) -> bool:
    """Whether a parsed config.json was written by pyreft's ``save``."""
    return "intervention_types" in config and "representations" in config


def load_pyreft_directory(reft_model_class: type, directory: Path, config: dict, model: nn.Module, *,
                          backend: Optional[str] = None, orthogonalization: str = "householder",
                          include_model: bool = False) -> ReftModel:
    """Attach to ``model`` the interventions of a pyreft directory whose config.json is ``config``, as a
    ``reft_model_class`` (ReftModel or a subclass); with ``include_model``, also load the base's trainable parameters
    from its ``pytorch_model.bin`` (``PYREFT_BASE_NAME``), if it has one.

    Weights shared by placing one instance at several sites are not recorded by pyreft (one intkey file per site,
    nothing linking them: pyvene's own load gives independent copies too), so they load as copies. pyvene's
    ``intervention_link_key`` is recorded, but it does more than share weights: the linked site edits the first
    site's edited hidden states instead of its own (pyvene 0.1.8, ``_gather_intervention_output``'s "hot" gather),
    which reft_fast's hooks do not do; such a directory is refused rather than loaded to compute something else."""
    hidden = model_hidden_size(model)
    keys = config.get("sorted_keys") or []
    dims = config.get("intervention_dimensions") or []
    representations, states = [], []
    for i, (rep, type_name) in enumerate(zip(config["representations"], config["intervention_types"])):
        layer, component, rank, link_key = _pyreft_representation(rep)
        if link_key is not None:
            raise ReftLoadError(f"{directory}: representation {i} has pyvene's intervention_link_key {link_key!r}, "
                                "which is not supported: pyvene feeds a linked site the first site's edited hidden "
                                "states instead of its own, and reft_fast's interventions edit each site's own")
        if i < len(dims) and dims[i] is not None and dims[i] != hidden:
            raise ReftLoadError(f"the pyreft model in {directory} was saved for hidden size {dims[i]} but the "
                                f"model has hidden size {hidden}")
        key = keys[i] if i < len(keys) else f"layer_{layer}_comp_{component}_unit_pos_nunit_1#0"
        state = _read_pyreft_state(_intkey_path(directory, key))
        cls = intervention_class(type_name)
        options = {}
        if cls.uses_rotation:
            options["orthogonalization"] = orthogonalization
        if cls.has_add_bias:
            options["add_bias"] = "proj_layer.bias" in state
        representations.append({"layer": layer, "component": component, "low_rank_dimension": rank,
                                "intervention": cls, **options})
        states.append(state)
    reft_model = reft_model_class(model, ReftConfig(representations), backend=backend)
    for intervention, state in zip(reft_model.interventions.values(), states):
        try:
            load_pyreft_state(intervention, state)
        except ValueError as err:  # tensors missing or of the wrong shape: not the file config.json describes
            raise ReftLoadError(f"{directory}: {err}") from None
    base_path = directory / PYREFT_BASE_NAME
    if include_model and base_path.is_file():
        load_base_parameters(model, _read_pyreft_state(base_path), base_path)
    return reft_model


# pyvene's RepresentationConfig fields, in the order a saved config.json lists them.
_REPRESENTATION_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension",
                          "intervention_type", "intervention", "subspace_partition", "group_key",
                          "intervention_link_key")


def _pyreft_representation(rep) -> tuple:
    """(layer, component, low_rank_dimension, intervention_link_key) of one saved representation: a list in pyvene's
    field order (what its save writes) or a dict."""
    if isinstance(rep, list):
        rep = dict(zip(_REPRESENTATION_FIELDS, rep))
    return rep["layer"], rep["component"], rep["low_rank_dimension"], rep.get("intervention_link_key")


def _read_pyreft_state(path: Path) -> dict:
    """One intervention's state (or the base's trainable parameters), as pyreft saves it: a torch pickle of tensors; a
    missing or unreadable file is a ReftLoadError naming it."""
    if not path.is_file():
        raise ReftLoadError(f"{path} is missing: the pyreft config.json in its folder names that intervention")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle raises EOFError, UnpicklingError, RuntimeError, ... depending on where
        raise ReftLoadError(f"{path} cannot be read ({type(err).__name__}: {err})") from None


def _intkey_path(directory: Path, key: str) -> Path:
    return directory / f"{_INTKEY_PREFIX}{key}{_INTKEY_SUFFIX}"


def holds_pyreft_weights(directory: Path) -> bool:
    """Whether ``directory`` holds pyvene's intkey_*.bin files (a pyreft save or trainer checkpoint directory)."""
    return any(directory.glob(f"{_INTKEY_PREFIX}*{_INTKEY_SUFFIX}"))


def load_pyreft_weights_into(reft_model: ReftModel, directory: Path, *, include_model: bool) -> None:
    """Load pyvene's intkey_<key>.bin files into ``reft_model``'s interventions of those keys and, with
    ``include_model``, its pytorch_model.bin into the base (``ReftModel.load_intervention``); every file is read and
    checked against the model (keys, types where a pyreft config.json names them, shapes) before any weight
    changes."""
    saved_keys = sorted(path.name[len(_INTKEY_PREFIX):-len(_INTKEY_SUFFIX)]
                        for path in directory.glob(f"{_INTKEY_PREFIX}*{_INTKEY_SUFFIX}"))
    saved_as = _saved_key_of(reft_model, saved_keys, directory)
    _check_pyreft_types(directory, reft_model, saved_as)
    states = {key: _read_pyreft_state(_intkey_path(directory, saved_as[key])) for key in saved_as}
    base_path = directory / PYREFT_BASE_NAME
    base = _read_pyreft_state(base_path) if include_model and base_path.is_file() else {}

    def load_all(interventions: nn.ModuleDict) -> None:
        for key, intervention in interventions.items():
            try:
                load_pyreft_state(intervention, states[key])
            except ValueError as err:  # a tensor missing or of the wrong shape for this intervention
                raise ReftLoadError(f"{_intkey_path(directory, saved_as[key])} does not match the model's "
                                    f"intervention: {err}") from None

    check_on_meta_copy(reft_model.interventions, load_all, directory)
    check_base_parameters(reft_model.model, base, base_path)
    load_all(reft_model.interventions)
    load_base_parameters(reft_model.model, base, base_path)


def pyvene_keys(reft_model: ReftModel) -> Optional[list[str]]:
    """The keys pyvene gives the model's interventions, in their order, or None where its config has a representation
    pyvene cannot express (one standing for several layers). They are ours except for an intervention given by a
    module path: ``"model.layers[4].output"`` is keyed ``comp_model_layers[4]_output_unit_pos_nunit_1#0`` there
    (pyvene 0.1.8, ``IntervenableModel._get_representation_key``), ``layer_4_comp_block_output_unit_pos_nunit_1#0``
    here."""
    representations = reft_model.reft_config.representations
    if len(representations) != len(reft_model.placements):
        return None
    taken: dict[str, int] = {}
    keys = []
    for representation, (layer, _) in zip(representations, reft_model.placements):
        component = representation.component
        site = f"comp_{component.replace('.', '_')}" if "." in component else f"layer_{layer}_comp_{component}"
        keys.append(intervention_key(site, taken))
    return keys


def _saved_key_of(reft_model: ReftModel, saved_keys: list[str], directory: Path) -> dict[str, str]:
    """{the model's key: the key of its intkey file}: the same key, or pyvene's (``pyvene_keys``) when the files are
    named so; keys that match neither way are refused (``check_same_keys``)."""
    model_keys = list(reft_model.interventions)
    theirs = pyvene_keys(reft_model)
    if theirs is not None and theirs != model_keys and sorted(theirs) == saved_keys:
        return dict(zip(model_keys, theirs))
    check_same_keys(f"{directory} (pyvene's {_INTKEY_PREFIX}<key>{_INTKEY_SUFFIX} files)", saved_keys, model_keys)
    return {key: key for key in model_keys}


def _check_pyreft_types(directory: Path, reft_model: ReftModel, saved_as: dict[str, str]) -> None:
    """Refuse intkey files of another intervention type when pyreft's config.json beside them (a ``save`` directory;
    trainer checkpoints have none) names the types; a type it names that reft_fast does not know is not checked.
    ``saved_as``: the model's key → its file's (``_saved_key_of``)."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ReftLoadError(f"{config_path} is not valid JSON ({err})") from None
    if not (isinstance(config, dict) and is_pyreft_config(config)):
        return
    model_key = {saved: key for key, saved in saved_as.items()}
    for key, type_name in zip(config.get("sorted_keys") or [], config["intervention_types"]):
        intervention = reft_model.interventions[model_key[key]] if key in model_key else None
        try:
            saved_class = intervention_class(type_name)
        except ValueError:
            continue
        if intervention is not None and not isinstance(intervention, saved_class):
            raise ReftLoadError(f"{_intkey_path(directory, key)} holds a {saved_class.__name__} ({config_path}), "
                                f"the model's intervention {model_key[key]!r} is a {type(intervention).__name__}")


register_directory_format("pyreft", is_pyreft_config, load_pyreft_directory)
register_weights_format("pyreft", holds_pyreft_weights, load_pyreft_weights_into)


# --------------------------------------------------------------------------------------------------------------------
# pyreft's ways of reaching into an intervention
# --------------------------------------------------------------------------------------------------------------------
class PyreftRotateLayer:
    """pyreft's view of an intervention's R: ``weight`` is the d×r matrix with orthonormal columns (our R [r, d]
    transposed, computed from the current parameters and differentiable), and calling it maps hidden states to the
    subspace, ``x @ weight``. Other attributes reach the module holding householder's state, if any."""

    def __init__(self, intervention: ReftIntervention):
        self._intervention = intervention

    @property
    def weight(self) -> torch.Tensor:
        return self._intervention.rotation_matrix().mT

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        return x.to(weight.dtype) @ weight

    def __getattr__(self, name: str):
        held = None if name == "_intervention" else self._intervention._modules.get("rotate_layer")
        if held is None:
            raise AttributeError(f"pyreft's rotate_layer view has no attribute {name!r} (it offers weight and "
                                 "calling it)")
        return getattr(held, name)


def _rotate_layer(intervention: ReftIntervention) -> PyreftRotateLayer:
    if not intervention.uses_rotation:
        raise AttributeError(f"{type(intervention).__name__} has no rotate_layer: it keeps no orthonormal R")
    return PyreftRotateLayer(intervention)


def _pyvene_pair_item(intervention: ReftIntervention, index: int) -> ReftIntervention:
    if index == 0:
        return intervention
    raise IndexError(f"{type(intervention).__name__}[{index!r}]: only [0] is kept, for scripts written against pyvene "
                     "≤ 0.1.6, whose interventions[key] was an (intervention, hook) pair; reft_fast's interventions[key] "
                     "is the intervention itself, and its hook is not exposed")


ReftIntervention.rotate_layer = property(_rotate_layer, doc=PyreftRotateLayer.__doc__)
ReftIntervention.__getitem__ = _pyvene_pair_item

