"""ReftModel: ReFT interventions on a frozen Hugging Face decoder, with pyreft's API.

How it attaches. The decoder layer list is found by structure (``reft_fast.core.hf``), the interventions are built
from the ReftConfig, each on its layer's device, and ``reft_fast.core.hooks`` registers one hook per intervened
(layer, component), once, at construction.

What a forward does. ``ReftModel.forward`` turns the locations into one int64 tensor [n_interventions, B, P] (checked
on the host once per batch, moved to each intervention's device once), computes R for all rotation interventions in
one batched call, draws the dropout seeds, and runs the base model with that state. Each hook replaces its hidden
state by the op's output: one copy of the hidden state per intervention, only the selected rows recomputed,
positions never rebuilt from Python lists. Gradient checkpointing recomputes layers during backward with the state
of the forward being backpropagated (``reft_fast.core.hooks`` explains how); R's producer can be backpropagated many
times (``interventions._ReplayableGraph``), which reentrant checkpointing needs.

Backends. ``backend`` (None/"auto" or a registered name) is resolved once per device the interventions sit on, at
their first forward there, and again only when ``backend`` is set.

Generation. ``generate`` edits the prompt pass only; decode steps read the edited prompt from the KV cache.

Saving. ``save(dir)`` / ``ReftModel.load(dir, model)``: ``reft_fast.core.saving`` (ours, and registered formats such
as pyreft's). pyvene's in-place pair, ``save_intervention(dir)`` / ``load_intervention(dir)``, writes the same directory
and loads weights into this model's interventions (ours, or pyreft's trainer checkpoints, which hold no config).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from reft_fast import ops
from reft_fast.core.config import ReftConfig, parse_component_path
from reft_fast.core.hf import component_module, find_decoder_layers, model_hidden_size
from reft_fast.core.adapters import Adapter, adapter_locations, check_adapter_names, multi_forward_state
from reft_fast.core.hooks import ForwardState, InterventionHooks, MultiAdapterHooks, runs_own_forward
from reft_fast.core.interventions import compute_rotations
from reft_fast.core.positions import check_locations, unit_locations_to_tensor
from reft_fast.core.saving import (load_reft_model, load_weights_in_place, resolve_load_directory,
                                   save_reft_model)

__all__ = ["DEFAULT_ADAPTER", "ReftModel", "get_reft_model", "intervention_key"]

# The name of the ReFT a ReftModel is built or loaded with (``load_adapter`` adds others under their own names).
DEFAULT_ADAPTER = "default"


def _module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (in ``parameters()`` order), else of its first buffer, else the CPU.
    Read per intervention on every forward: a walk over the submodules' own dicts, without the generators of
    ``parameters()`` (6 µs for a LoReFT intervention, 2026-11-30)."""
    for kind in ("_parameters", "_buffers"):
        stack = [module]
        while stack:
            current = stack.pop()
            for tensor in getattr(current, kind).values():
                if tensor is not None:
                    return tensor.device
            stack.extend(reversed([child for child in current._modules.values() if child is not None]))
    return torch.device("cpu")


def _component_resolver(model: nn.Module, layers_path: str, layers: nn.ModuleList) -> Callable[[str], tuple[int, str]]:
    """The resolver of pyvene's component paths for ``model``: ``"model.layers[15].mlp.output"`` → (15,
    "mlp_output"). The path is walked on the model and the module it reaches is recognized by identity, so any path
    to a decoder layer (a PEFT wrapper's ``base_model.model.model.layers[15]`` too), its attention or its MLP works."""
    sites: dict[int, tuple[int, str]] = {}
    for index, block in enumerate(layers):
        sites[id(block)] = (index, "block")
        for kind in ("attention", "mlp"):
            try:
                sites.setdefault(id(component_module(block, f"{kind}_output", index)), (index, kind))
            except ValueError:  # a layer without that submodule: paths to it are refused below
                pass

    def resolve(component: str) -> tuple[int, str]:
        steps, io = parse_component_path(component)
        module = model
        for step in steps:
            try:
                module = module[step] if isinstance(step, int) else getattr(module, step)
            except (AttributeError, IndexError, KeyError, TypeError):
                what = f"[{step}]" if isinstance(step, int) else f"attribute {step!r}"
                raise ValueError(f"component {component!r}: {type(module).__name__} has no {what}") from None
        site = sites.get(id(module))
        if site is None:
            raise ValueError(f"component {component!r} names a {type(module).__name__}, which reft_fast cannot edit: "
                             f"it intervenes on the decoder layers ({layers_path}[i]) and on their attention and MLP "
                             "modules only, at their input or output (block_*, attention_*, mlp_* components)")
        return site[0], f"{site[1]}_{io}"

    return resolve


def intervention_key(site: str, taken: dict) -> str:
    """pyvene's key of an intervention at ``site`` (``layer_<l>_comp_<component>``, or pyvene's ``comp_<path>`` for
    one given by a module path), numbered among the keys already ``taken`` (updated), so that pyreft's
    intkey_<key>.bin files map one to one."""
    proposal = f"{site}_unit_pos_nunit_1"
    taken[proposal] = taken.get(proposal, -1) + 1
    return f"{proposal}#{taken[proposal]}"


class ReftModel(nn.Module):
    """A frozen base model with ReFT interventions attached by hooks.

    Attributes: ``model`` (the base, all parameters requires_grad=False), ``interventions`` (nn.ModuleDict with
    pyvene's keys, in config order = the order of the locations), ``placements`` ((layer, component) of each
    intervention, same order), ``reft_config``, ``backend``.
    """

    def __init__(self, model: nn.Module, reft_config: ReftConfig, *, backend: Optional[str] = None):
        super().__init__()
        if isinstance(model, ReftConfig) and isinstance(reft_config, nn.Module):
            model, reft_config = reft_config, model  # pyreft's argument order: ReftModel(config, model)
        if not isinstance(reft_config, ReftConfig):
            raise TypeError(f"reft_config must be a reft_fast.ReftConfig, got {type(reft_config).__name__}")
        self.backend = backend
        self.model = model
        self.reft_config = reft_config
        self.layers_path, layers = find_decoder_layers(model)
        self.hidden_size = model_hidden_size(model)
        model.requires_grad_(False)

        self.interventions = nn.ModuleDict()
        self.placements: list[tuple[int, str]] = []
        taken: dict = {}
        placed_at: dict[int, tuple[int, torch.device]] = {}  # id of an intervention → (its first layer, its device)
        resolve_component = _component_resolver(model, self.layers_path, layers)
        for layer, component, intervention in reft_config.build(len(layers), self.hidden_size, resolve_component):
            key = intervention_key(f"layer_{layer}_comp_{component}", taken)
            # Each intervention lives where its layer lives (models split over devices keep working).
            device = _module_device(layers[layer])
            first_layer, first_device = placed_at.setdefault(id(intervention), (layer, device))
            if device != first_device:  # moving it would take it away from the first layer: a device error later
                raise ValueError(f"one intervention instance is given at layer {first_layer} ({first_device}) and at "
                                 f"layer {layer} ({device}): a module sits on one device; give each of those layers "
                                 "its own intervention, or keep them on one device")
            self.interventions[key] = intervention.to(device)
            self.placements.append((layer, component))
        self._in_order = tuple(self.interventions.values())  # what the hooks index, built once
        self._hooks = InterventionHooks(model, layers, self.placements, self._in_order)
        self._layers = tuple(layers)  # a tuple: the layers are the base's submodules, not this module's a second time
        self._adapters = {DEFAULT_ADAPTER: Adapter(reft_config, self.interventions, self.placements)}
        self.active_adapter = DEFAULT_ADAPTER

    @property
    def backend(self) -> Optional[str]:
        """The backend asked for: a registered name, or None/"auto" (REFT_FAST_BACKEND, else the device's default)."""
        return self._backend

    @backend.setter
    def backend(self, backend: Optional[str]) -> None:
        if backend not in (None, "auto") + ops.backend_names():
            raise ValueError(f"unknown backend {backend!r}; expected one of {list(ops.backend_names())} or None")
        self._backend = backend
        self._backend_by_device: dict[torch.device, str] = {}

    def _backend_on(self, device: torch.device) -> str:
        if device not in self._backend_by_device:
            self._backend_by_device[device] = ops.resolve_backend(self._backend, device)
        return self._backend_by_device[device]

    def _held_adapters(self) -> list[nn.ModuleDict]:
        """The interventions of the loaded ReFTs other than the active one: not submodules (``parameters()``,
        ``state_dict()`` and the optimizer see the active ReFT only), so the conversions below carry them along."""
        return [adapter.interventions for adapter in self._adapters.values()
                if adapter.interventions is not self.interventions]

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(), ... reach every loaded ReFT: one moved with the base must serve from its device
        # after set_adapter, and in a mixed batch, as the active one does.
        super()._apply(fn, recurse)
        if recurse:
            for interventions in self._held_adapters():
                interventions._apply(fn)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for interventions in self._held_adapters():
            interventions.train(mode)
        return self

    def remove_hooks(self) -> None:
        """Detach from the base model (removes this ReftModel's hooks only)."""
        self._hooks.remove()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The intervention parameters (the only ones an optimizer should get)."""
        return [p for p in self.interventions.parameters() if p.requires_grad]

    def count_parameters(self, include_model: bool = False) -> int:
        """Trainable intervention parameters, plus the base model's trainable ones with ``include_model`` (pyvene)."""
        total = sum(p.numel() for p in self.trainable_parameters())
        if include_model:
            total += sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return total

    def disable_model_gradients(self) -> None:
        """Freeze the base model and put it in eval mode (pyvene's; the base is frozen at construction already)."""
        self.model.eval()
        self.model.requires_grad_(False)

    def set_device(self, device: Union[str, torch.device], set_model: bool = True) -> None:
        """Move the base model (unless ``set_model=False``) and the interventions to ``device`` (pyvene's)."""
        if set_model:
            self.model.to(device)
        self.interventions.to(device)

    def get_device(self) -> torch.device:
        """The base model's device (pyvene's): ``model.device``, else the device of its first parameter."""
        device = getattr(self.model, "device", None)
        return device if isinstance(device, torch.device) else _module_device(self.model)

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        base_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        base_total = sum(p.numel() for p in self.model.parameters())
        print(f"trainable intervention params: {trainable:,d} || trainable model params: {base_trainable:,d}\n"
              f"model params: {base_total:,d} || trainable%: {100 * (trainable + base_trainable) / base_total}")

    # ----------------------------------------------------------------------------------------------------------------
    # Several ReFTs over one base
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def loaded_adapters(self) -> tuple:
        """The names of the ReFTs this model holds ("default" is the one it was built or loaded with)."""
        return tuple(self._adapters)

    def load_adapter(self, load_directory: Union[str, os.PathLike], adapter_name: str, *,
                     orthogonalization: str = "householder") -> None:
        """Add the ReFT saved in ``load_directory`` (ours or a registered format, a local directory or a Hub repo id,
        as ``ReftModel.load``) under ``adapter_name``; the active ReFT stays active. The base is not modified."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if adapter_name in self._adapters:
            raise ValueError(f"an adapter named {adapter_name!r} is loaded already; delete_adapter it first")
        loaded = type(self).load(load_directory, self.model, backend=self.backend,
                                 orthogonalization=orthogonalization)
        loaded.remove_hooks()  # its interventions run through this model's hooks
        self._adapters[adapter_name] = Adapter(loaded.reft_config, loaded.interventions, loaded.placements)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the ReFT that forward, generate, save and training use when no adapter_names is
        given (its interventions become ``interventions``)."""
        adapter = self._adapter(adapter_name)
        self._hooks.remove()
        self.interventions, self.placements, self.reft_config = (adapter.interventions, adapter.placements,
                                                                 adapter.reft_config)
        self._in_order = tuple(self.interventions.values())
        self._hooks = InterventionHooks(self.model, self._layers, self.placements, self._in_order)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop a loaded ReFT other than the active one."""
        self._adapter(adapter_name)
        if adapter_name == self.active_adapter:
            raise ValueError(f"adapter {adapter_name!r} is the active one: set_adapter another before deleting it")
        del self._adapters[adapter_name]

    def _adapter(self, adapter_name: str) -> Adapter:
        if adapter_name not in self._adapters:
            raise ValueError(f"unknown adapter {adapter_name!r}; loaded adapters: {list(self._adapters)}")
        return self._adapters[adapter_name]

    def _step_parameters(self, adapter: Adapter) -> list:
        """(each intervention's edit_steps, its device) for ``adapter``, R computed as its own forward would."""
        interventions = tuple(adapter.interventions.values())
        custom = [type(i).__name__ for i in interventions if runs_own_forward(i)]
        if custom:
            raise ValueError(f"interventions with their own forward() ({custom}) cannot share a batch with other "
                             "ReFTs: run that ReFT alone (set_adapter, no adapter_names)")
        devices = [_module_device(intervention) for intervention in interventions]
        rotations = _rotations(interventions, devices, [False] * len(interventions))
        return [(intervention.edit_steps(R), device)
                for intervention, R, device in zip(interventions, rotations, devices)]

    @contextlib.contextmanager
    def _mixed_batch(self, base: Mapping, adapter_names, locations, *, expandable: bool) -> Iterator[None]:
        """Hooks and state for a batch whose examples use the ReFTs named in ``adapter_names`` (None: plain)."""
        if torch.is_grad_enabled():
            raise RuntimeError("a batch with adapter_names is inference only: call forward under torch.no_grad() "
                               "(generate does); train one ReFT at a time")
        batch_size, seq_len = _batch_shape(base)
        used = check_adapter_names(adapter_names, batch_size, list(self._adapters))
        located = adapter_locations(base, used, self._adapters, locations, batch_size, seq_len)
        sites, state = multi_forward_state(adapter_names, used, self._adapters, located, self._step_parameters,
                                           self._backend_on, expandable=expandable, prompt_length=seq_len)
        hooks = MultiAdapterHooks(self.model, self._layers, sites)
        try:
            with hooks.run(state):
                yield
        finally:
            hooks.remove()

    # ----------------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------------
    def _locations(self, base: Mapping, unit_locations, intervention_locations) -> tuple[torch.Tensor, int]:
        """The edited positions as one int64 tensor [n_interventions, batch, P], checked against ``base``, and the
        sequence length they index."""
        batch_size, seq_len = _batch_shape(base)
        n = len(self.interventions)
        if unit_locations is None and intervention_locations is None:
            raise ValueError("no positions to edit were given: pass unit_locations={'sources->base': (None, "
                             "locations)} with locations nested [intervention][example][position] (pyreft's form), "
                             "or intervention_locations=<int tensor [n_interventions, batch, positions]>")
        if unit_locations is not None and intervention_locations is not None:
            raise ValueError("give the edited positions once: unit_locations or intervention_locations, not both")
        if unit_locations is not None:
            locations = unit_locations_to_tensor(unit_locations, n, batch_size)
        else:
            locations = intervention_locations
            check_locations(locations, n, batch_size)
        # Values are checked where reading them is free: on the CPU, once per batch, before the single transfer.
        if locations.device.type == "cpu":
            check_locations(locations, n, batch_size, seq_len=seq_len)
        return locations.long(), seq_len

    def _editing(self, base: Mapping, unit_locations, intervention_locations, adapter_names, *, expandable: bool):
        """The context in which the base runs edited: the active ReFT's hooks, or those of a mixed batch."""
        if adapter_names is None:
            return self._hooks.run(self._prepare(base, unit_locations, intervention_locations, expandable=expandable))
        if unit_locations is not None:
            raise ValueError("with adapter_names, give positions as intervention_locations={adapter name: tensor} "
                             "(or None for each adapter's saved position spec), not unit_locations")
        return self._mixed_batch(base, adapter_names, intervention_locations, expandable=expandable)

    def _prepare(self, base: Mapping, unit_locations, intervention_locations, *, expandable: bool) -> ForwardState:
        locations, seq_len = self._locations(base, unit_locations, intervention_locations)
        devices = [_module_device(intervention) for intervention in self._in_order]
        by_device = {device: locations.to(device, non_blocking=True).contiguous() for device in dict.fromkeys(devices)}
        backends = tuple(self._backend_on(device) for device in devices)
        runs_own = self._hooks.runs_own_forward
        rotations = _rotations(self._in_order, devices, runs_own, replayable=self._checkpointed())
        # Each edit checked and bound once per forward, not at each hook call (nor again in a recomputation)
        edits = [None if own else intervention.prepare(R, seed)
                 for intervention, R, seed, own in zip(self._in_order, rotations, self._seeds(), runs_own)]
        return ForwardState(by_device, edits, backends, expandable=expandable, prompt_length=seq_len)

    def _checkpointed(self) -> bool:
        """Whether a layer of the base is under transformers' gradient checkpointing (``gradient_checkpointing_enable``
        sets the flag on each layer), whose backward may recompute the edits reentrantly: R's graph must then be
        replayable. Other reentrant recomputations of layers (a user's own ``checkpoint`` around a single layer) are
        not seen; there autograd refuses the second pass through R's map loudly ("backward through the graph a second
        time"). A checkpoint around the whole ReftModel forward computes R again itself and needs nothing."""
        return any(getattr(layer, "gradient_checkpointing", False) for layer in self._layers)

    def _seeds(self) -> list:
        # Drawn once per forward so that a checkpoint recomputation regenerates the same dropout masks.
        return [ops.draw_seed() if intervention.training and intervention.dropout_rate > 0 else None
                for intervention in self._in_order]

    def forward(self, base: Mapping, unit_locations=None, *, intervention_locations: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, sources=None, subspaces=None,
                output_original_output: bool = False, adapter_names: Optional[Sequence[Optional[str]]] = None,
                **kwargs):
        """Run the base model with the interventions applied; returns ``(original_output or None, intervened_output)``.

        Args:
            base: the model inputs (input_ids, attention_mask, ...): a dict or the tokenizer's BatchEncoding.
            unit_locations: pyreft's ``{"sources->base": (None, nested)}``, nested lists [intervention][example][pos].
            intervention_locations: the same as one int tensor [n_interventions, batch, P] (−1 = none).
            labels: passed to the base model, so ``intervened_output.loss`` is its LM loss.
            output_original_output: also run the base model without interventions (pyvene's flag).
            adapter_names: one loaded ReFT's name (or None: the plain model) per example, to serve several ReFTs in
                one batch (inference only: under torch.no_grad()). intervention_locations is then a dict
                {name: int tensor [n_interventions of that ReFT, batch, P]}, or None to compute each ReFT's positions
                from its saved position spec and the attention mask (left padding allowed).
            **kwargs: passed to the base model (e.g. use_cache=False).
        """
        if sources is not None:
            raise ValueError("sources are not supported: ReFT interventions are sourceless")
        if subspaces is not None:
            raise ValueError("subspaces are not supported: every intervention edits its full low-rank subspace")
        editing = self._editing(base, unit_locations, intervention_locations, adapter_names, expandable=False)
        if labels is not None:
            kwargs["labels"] = labels
        original = None
        if output_original_output:
            with torch.no_grad():
                original = self.model(**base, **kwargs)
        with editing:
            output = self.model(**base, **kwargs)
        return original, output

    @torch.no_grad()
    def generate(self, base: Mapping, unit_locations=None, *, intervention_locations: Optional[torch.Tensor] = None,
                 intervene_on_prompt: bool = True, sources=None, subspaces=None, output_original_output: bool = False,
                 adapter_names: Optional[Sequence[Optional[str]]] = None, **generate_kwargs):
        """``model.generate`` with the prompt pass edited; returns ``(original_ids or None, generated_ids)``.

        The locations index the prompt (as given in ``base``, left padding included). Decode steps use the KV cache
        of the edited prompt and run the plain model. Greedy, sampling and beam search all work. ``adapter_names``
        serves several ReFTs in one batch, as in ``forward``.
        """
        if not intervene_on_prompt:
            raise ValueError("intervene_on_prompt=False is not supported: ReFT edits prompt positions only")
        if sources is not None or subspaces is not None:
            raise ValueError("sources and subspaces are not supported: ReFT interventions are sourceless")
        editing = self._editing(base, unit_locations, intervention_locations, adapter_names, expandable=True)
        original = self.model.generate(**base, **generate_kwargs) if output_original_output else None
        with editing:
            output = self.model.generate(**base, **generate_kwargs)
        return original, output

    # ----------------------------------------------------------------------------------------------------------------
    # Save / load
    # ----------------------------------------------------------------------------------------------------------------
    def save(self, save_directory: Union[str, os.PathLike], *, save_to_hf_hub: bool = False,
             hf_repo_name: Optional[str] = None, include_model: bool = False) -> None:
        """Write config.json (every hyperparameter) and interventions.safetensors; optionally push to the Hub.

        ``include_model`` (pyvene's) also writes the base's trainable parameters (a head trained with the
        interventions) to base_trainable.safetensors; ``load(..., include_model=True)`` reads them back.
        """
        save_reft_model(self, save_directory, save_to_hf_hub=save_to_hf_hub, hf_repo_name=hf_repo_name,
                        include_model=include_model)

    def save_intervention(self, save_directory: Union[str, os.PathLike], include_model: bool = True) -> None:
        """pyvene's in-place save (what pyreft's trainer writes each checkpoint with): the interventions' weights and,
        with ``include_model``, the base's trainable parameters.

        It writes what ``save`` writes (config.json, interventions.safetensors, base_trainable.safetensors when part
        of the base trains), not pyvene's weights-only intkey_*.bin and pytorch_model.bin: ``load_intervention``
        reads the directory back into this model as pyvene's does, and because the config is there too
        ``ReftModel.load``, ``load_adapter`` and the command line read it as well (pyvene's files alone can rebuild
        nothing, pyreft issue #109), while the tensors stay safetensors, which load without unpickling.
        """
        save_reft_model(self, save_directory, include_model=include_model)

    def load_intervention(self, load_directory: Union[str, os.PathLike], include_model: bool = True) -> None:
        """pyvene's in-place load (what pyreft's trainer restores its best checkpoint with): copy the weights saved in
        ``load_directory`` into this model's interventions, matched by key (``layer_<l>_comp_<component>_unit_pos_
        nunit_1#<i>``), and, with ``include_model``, the base's saved trainable parameters, if it holds any.

        Reads a directory written by ``save`` or ``save_intervention``, or pyreft's weights as pyvene writes them
        (``intkey_<key>.bin``, ``pytorch_model.bin``): the ``checkpoint-N/intervenable_model`` directories of pyreft's
        trainer, which hold no config.json, and pyreft's ``save`` directories. pyreft's ``.bin`` files are read with
        ``torch.load(weights_only=True)``. A directory whose interventions are not this model's (a key missing or
        extra, another type or shape) is refused with ReftLoadError before any weight changes.
        """
        load_weights_in_place(self, load_directory, include_model=include_model)

    @classmethod
    def load(cls, load_directory: Union[str, os.PathLike], model: nn.Module,
             local_directory: Optional[Union[str, os.PathLike]] = None, from_huggingface_hub: bool = False,
             include_model: bool = False, *, backend: Optional[str] = None,
             orthogonalization: str = "householder") -> "ReftModel":
        """Attach saved interventions to ``model``: a directory written by ``save``, or in a registered format
        (pyreft's, registered by ``reft_fast.compat``).

        As in pyvene, ``load_directory`` is a Hugging Face Hub repo id when ``from_huggingface_hub`` is set or no
        such local directory exists; it is then downloaded (to ``local_directory`` if given, else the Hub cache).
        Tensors are read on the CPU and copied to each intervention's device, so a directory saved on any device
        loads on any other. ``orthogonalization`` applies to pyreft directories (ours record it). ``include_model``
        (pyvene's) also loads the base parameters that ``save(..., include_model=True)`` wrote (pyreft's
        ``pytorch_model.bin`` in a pyreft directory).
        """
        directory = resolve_load_directory(load_directory, from_huggingface_hub=from_huggingface_hub,
                                           local_directory=local_directory)
        return load_reft_model(cls, directory, model, backend=backend, orthogonalization=orthogonalization,
                               include_model=include_model)


def _batch_shape(base: Mapping) -> tuple[int, int]:
    """(batch, sequence length) of the model inputs ``base``, checked."""
    if not isinstance(base, Mapping):  # a dict, or the tokenizer's BatchEncoding
        raise TypeError(f"base must be a mapping of model inputs (input_ids, attention_mask, ...), got "
                        f"{type(base).__name__}")
    inputs = base.get("input_ids", base.get("inputs_embeds"))
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError("base must hold input_ids [batch, seq] (or inputs_embeds [batch, seq, hidden])")
    return tuple(inputs.shape[:2])


def _rotations(interventions: tuple, devices: list, runs_own: Sequence[bool], replayable: bool = True) -> list:
    """R for every rotation intervention (None elsewhere), one batched call per (method, shape, device);
    ``replayable``: see ``compute_rotations``."""
    groups: dict = {}
    for i, (intervention, device) in enumerate(zip(interventions, devices)):
        if intervention.uses_rotation and not runs_own[i]:
            key = (intervention.orthogonalization, intervention.low_rank_dimension, intervention.embed_dim, device)
            groups.setdefault(key, []).append(i)
    rotations = [None] * len(interventions)
    for (method, *_), members in groups.items():
        inputs = [interventions[i].rotation_inputs() for i in members]
        for i, R in zip(members, compute_rotations(method, inputs, replayable=replayable)):
            rotations[i] = R
    return rotations


def get_reft_model(model: nn.Module, reft_config: ReftConfig, set_device: bool = True,
                   disable_model_grads: bool = True, *, backend: Optional[str] = None) -> ReftModel:
    """pyreft's entry point: wrap ``model`` (frozen) with the interventions of ``reft_config``.

    Interventions are always placed on their layer's device (``set_device`` is accepted for pyreft compatibility) and
    the base is always frozen (``disable_model_grads=False`` is refused).
    """
    if not disable_model_grads:
        raise ValueError("disable_model_grads=False is not supported: reft_fast keeps the base model frozen")
    return ReftModel(model, reft_config, backend=backend)
