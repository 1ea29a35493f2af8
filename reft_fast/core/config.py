"""ReftConfig: which interventions sit where, with pyreft's keys, loadable from YAML or JSON.

pyreft style (intervention instances)::

    ReftConfig(representations={"layer": 15, "component": "block_output", "low_rank_dimension": 4,
                                "intervention": LoreftIntervention(embed_dim=4096, low_rank_dimension=4)})

Components are named (``COMPONENTS``) or, as in pyvene, written as a module path with ``.input`` / ``.output``:
``"model.layers[15].output"`` is block_output of layer 15, ``"model.layers[15].mlp.output"`` mlp_output. A path is
resolved against the model when the ReftModel is built (the module must be a decoder layer, its attention or its MLP),
and its layer index wins over ``layer``, as in pyvene, which hooks the module the path names.

File style (interventions by name, built when the model's hidden size is known; ``layer`` may then be a list, a
pyreft-style ``"3;9;18;24"`` or ``"all"``)::

    representations:
      - {layer: "3;9;18;24", component: block_output, intervention: loreft, low_rank_dimension: 4, dropout: 0.05}
    positions: f5+l5
    share_weights: false
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from reft_fast.core.interventions import INTERVENTION_TYPES, OPTION_KEYS, ReftIntervention, intervention_class
from reft_fast.core.positions import parse_positions

__all__ = ["COMPONENTS", "Representation", "ReftConfig", "parse_component_path"]

COMPONENTS = ("block_input", "block_output", "mlp_input", "mlp_output", "attention_input", "attention_output")
# pyvene's named components that are not a decoder layer's, its attention's or its MLP's input or output.
_UNSUPPORTED_PYVENE_COMPONENTS = ("mlp_activation", "attention_value_output", "head_attention_value_output",
                                  "query_output", "key_output", "value_output", "head_query_output",
                                  "head_key_output", "head_value_output", "attention_weight")
# pyvene's string access: attribute names and [index] steps joined by dots, ending in .input or .output.
_PATH_STEP = r"[A-Za-z_]\w*(?:\[\d+\])*"
_COMPONENT_PATH = re.compile(rf"^(?P<path>{_PATH_STEP}(?:\.{_PATH_STEP})*)\.(?P<io>input|output)$")
# A representation may carry the intervention's hyperparameters (OPTION_KEYS) when it is given by name or class.
# pyvene's max_number_of_units sizes its position buffers; reft_fast takes any number of positions, so it is checked
# and otherwise ignored.
_KEYS = ("layer", "component", "low_rank_dimension", "intervention", "intervention_type", "unit",
         "max_number_of_units") + OPTION_KEYS


def parse_component_path(component: str) -> Optional[tuple[list, str]]:
    """pyvene's string access ``"model.layers[15].mlp.output"`` → (steps, io): ``["model", "layers", 15, "mlp"]``
    (attribute names and list indices, in order) and ``"output"``; None for a named component (``block_output``)."""
    if component in COMPONENTS or "." not in component:
        return None
    match = _COMPONENT_PATH.match(component)
    if match is None:
        raise ValueError(f"component {component!r} is neither a named component {list(COMPONENTS)} nor a module path "
                         "like 'model.layers[15].output' (attribute names and [index] steps, ending in .input or "
                         ".output)")
    steps: list = []
    for part in match["path"].split("."):
        name, *indices = part.replace("]", "").split("[")
        steps += [name, *map(int, indices)]
    return steps, match["io"]


def _check_component(component, index: int) -> None:
    if not isinstance(component, str):
        raise TypeError(f"representations[{index}]: component must be a string, got {type(component).__name__}")
    if component in _UNSUPPORTED_PYVENE_COMPONENTS:
        raise ValueError(f"representations[{index}]: pyvene's component {component!r} is not supported: reft_fast "
                         f"edits the hidden states of a decoder layer, its attention or its MLP "
                         f"({list(COMPONENTS)}, or a path such as 'model.layers[15].mlp.output')")
    if component not in COMPONENTS and parse_component_path(component) is None:
        raise ValueError(f"representations[{index}]: unknown component {component!r}; expected one of "
                         f"{list(COMPONENTS)} or a module path such as 'model.layers[15].output'")


@dataclass
class Representation:
    """One entry of ``ReftConfig.representations``: an intervention at (layer, component)."""

    layer: Union[int, list, str]
    component: str = "block_output"
    low_rank_dimension: Optional[int] = None
    intervention: Union[ReftIntervention, type, str, None] = None
    options: dict = field(default_factory=dict)

    def layers(self, num_layers: int) -> list[int]:
        """The layer indices this entry stands for (several only for a by-name intervention)."""
        layer = self.layer
        if isinstance(layer, str):
            layer = list(range(num_layers)) if layer.strip() == "all" else _parse_layer_list(layer)
        layers = [layer] if isinstance(layer, int) else list(layer)
        for value in layers:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"layer must be an int (or, for an intervention given by name, a list of ints, "
                                 f"'3;9;18' or 'all'), got {self.layer!r}")
            if not 0 <= value < num_layers:
                raise ValueError(f"layer {value} is out of range: the model has {num_layers} decoder layers "
                                 f"(0..{num_layers - 1})")
        return layers

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "component": self.component}
        if isinstance(self.intervention, ReftIntervention):
            out["intervention"] = self.intervention.config_dict()
            return out
        out["intervention"] = self.intervention.__name__ if isinstance(self.intervention, type) else self.intervention
        if self.low_rank_dimension is not None:
            out["low_rank_dimension"] = self.low_rank_dimension
        out.update(self.options)
        return out


def _parse_layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", ";").split(";") if part.strip()]
    except ValueError:
        raise ValueError(f"layer string must be 'all' or indices like '3;9;18;24', got {text!r}") from None


def _as_representation(entry, index: int, default_type) -> Representation:
    if isinstance(entry, Representation):
        return entry
    if not isinstance(entry, dict):
        raise TypeError(f"representations[{index}] must be a dict, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise ValueError(f"representations[{index}] has unknown keys {unknown}; accepted keys: {list(_KEYS)}")
    if entry.get("unit", "pos") != "pos":
        raise ValueError(f"representations[{index}]: only unit='pos' (token positions) is supported, got "
                         f"{entry['unit']!r}")
    units = entry.get("max_number_of_units", 1)
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise ValueError(f"representations[{index}]: max_number_of_units must be a positive int, got {units!r}")
    component = entry.get("component", "block_output")
    _check_component(component, index)
    named_by_path = parse_component_path(component) is not None  # the path names the layer
    if "layer" not in entry and not named_by_path:
        raise ValueError(f"representations[{index}] needs a 'layer'")
    layer = entry.get("layer")
    intervention = entry.get("intervention", entry.get("intervention_type", default_type))
    options = {k: entry[k] for k in OPTION_KEYS if k in entry}
    rank = entry.get("low_rank_dimension")
    if intervention is None:
        raise ValueError(f"representations[{index}] needs an 'intervention' (an instance, a class or a name such as "
                         f"'loreft'; known: {sorted(INTERVENTION_TYPES)})")
    if isinstance(intervention, dict):  # a saved config_dict(): type + hyperparameters
        intervention = dict(intervention)
        rank = intervention.pop("low_rank_dimension", rank)
        intervention.pop("embed_dim", None)
        options = {**intervention, **options}
        intervention = options.pop("type")
    if isinstance(intervention, ReftIntervention):
        if options:
            raise ValueError(f"representations[{index}]: {sorted(options)} belong to the intervention's constructor "
                             "when the intervention is an instance")
        if rank is not None and rank != intervention.low_rank_dimension:
            raise ValueError(f"representations[{index}]: low_rank_dimension {rank} differs from the intervention's "
                             f"{intervention.low_rank_dimension}")
        if not named_by_path and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise ValueError(f"representations[{index}]: an intervention instance sits at one layer (an int); got "
                             f"layer={layer!r}. Give one representation per layer, or the intervention by name")
    else:
        intervention = intervention_class(intervention)
        if rank is None:
            raise ValueError(f"representations[{index}]: low_rank_dimension is required when the intervention is "
                             "given by name or class")
    return Representation(layer, component, rank, intervention, options)


class ReftConfig:
    """Interventions of a ReftModel, in order (the order of ``unit_locations`` / ``intervention_locations``).

    Args:
        representations: one dict or a list of dicts with keys layer, component, low_rank_dimension, intervention
            (an instance, a class or a name), and for interventions given by name their hyperparameters
            (dropout, act_fn, add_bias, dtype, orthogonalization).
        intervention_types: pyvene's default intervention class for entries without one.
        positions: the position spec the interventions were trained with (``"f7+l7"``); saved with the model and used
            by the data pipeline, not by the forward (which takes explicit locations).
        share_weights: pyreft's flag for two-sided specs (see ``reft_fast.core.positions``).
    """

    def __init__(self, representations, *, intervention_types=None, positions: Optional[str] = None,
                 share_weights: bool = False):
        entries = [representations] if isinstance(representations, (dict, Representation)) else representations
        if not isinstance(entries, (list, tuple)) or not entries:
            raise ValueError("representations must be a dict or a non-empty list of dicts")
        if isinstance(intervention_types, (list, tuple)):
            if len(intervention_types) != len(entries):
                raise ValueError(f"intervention_types has {len(intervention_types)} entries for {len(entries)} "
                                 "representations")
            defaults = list(intervention_types)
        else:
            defaults = [intervention_types] * len(entries)
        self.representations = [_as_representation(e, i, t) for i, (e, t) in enumerate(zip(entries, defaults))]
        if positions is not None:
            parse_positions(positions)
        if not isinstance(share_weights, bool):
            raise TypeError(f"share_weights must be a bool, got {type(share_weights).__name__}")
        self.positions = positions
        self.share_weights = share_weights

    def __repr__(self) -> str:
        return f"ReftConfig({self.to_dict()!r})"

    def build(self, num_layers: int, hidden_size: int, resolve_component: Optional[Callable[[str], tuple[int, str]]]
              = None) -> list[tuple[int, str, ReftIntervention]]:
        """(layer, component, intervention) for every intervention, creating those given by name.

        ``resolve_component`` maps a module-path component (``"model.layers[15].output"``) to (layer, named
        component); the ReftModel passes one that looks the path up in its model.
        """
        built = []
        for index, rep in enumerate(self.representations):
            if parse_component_path(rep.component) is None:
                layers, component = rep.layers(num_layers), rep.component
            elif resolve_component is None:
                raise ValueError(f"representations[{index}]: the component path {rep.component!r} can only be "
                                 "resolved against a model (build the ReftModel)")
            else:
                layer, component = resolve_component(rep.component)
                layers = [layer]
            if isinstance(rep.intervention, ReftIntervention):
                if rep.intervention.embed_dim != hidden_size:
                    raise ValueError(f"representations[{index}]: the intervention's embed_dim "
                                     f"{rep.intervention.embed_dim} differs from the model's hidden size "
                                     f"{hidden_size}")
                built.append((layers[0], component, rep.intervention))
                continue
            for layer in layers:
                built.append((layer, component, rep.intervention(
                    embed_dim=hidden_size, low_rank_dimension=rep.low_rank_dimension, **rep.options)))
        return built

    # ----------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"representations": [rep.to_dict() for rep in self.representations], "positions": self.positions,
                "share_weights": self.share_weights}

    @classmethod
    def from_dict(cls, data: dict) -> "ReftConfig":
        if not isinstance(data, dict):
            raise TypeError(f"a ReftConfig mapping must be a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {"representations", "intervention_types", "positions", "share_weights"})
        if unknown:
            raise ValueError(f"unknown ReftConfig keys {unknown}; expected representations, intervention_types, "
                             "positions, share_weights")
        if "representations" not in data:
            raise ValueError("a ReftConfig mapping needs 'representations'")
        return cls(copy.deepcopy(data["representations"]), intervention_types=data.get("intervention_types"),
                   positions=data.get("positions"), share_weights=data.get("share_weights", False))

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ReftConfig":
        """Read a ``.json``, ``.yaml`` or ``.yml`` file holding the ``to_dict()`` mapping."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".json":
            data: Any = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ValueError(f"config file must end in .json, .yaml or .yml, got {path.name!r}")
        return cls.from_dict(data)

    def save(self, path: Union[str, Path]) -> None:
        """Write ``to_dict()`` as JSON or YAML (by the file's suffix)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2))
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            raise ValueError(f"config file must end in .json, .yaml or .yml, got {path.name!r}")
