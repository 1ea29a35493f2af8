"""ReftModel: ReFT interventions on a frozen Hugging Face decoder, with pyreft's API.

How it attaches. The decoder layer list is found by structure (``model.layers``, ``transformer.h``, ...; see
``find_decoder_layers``), and each intervened (layer, component) gets one forward hook, registered once at
construction: a forward hook for ``*_output`` components (the layer, its attention or its MLP module), a forward
pre-hook for ``*_input``. The hooks never touch anyone else's hooks (pyvene removes every hook of the model on each
forward, DeepSpeed ZeRO-3's included).

What a forward does. ``ReftModel.forward`` turns the locations into one int64 tensor [n_interventions, B, P] (checked
on the host once per batch, moved to the device once), computes R for all rotation interventions in one batched call,
draws the dropout seeds, and runs the base model. Each hook replaces its hidden state by the op's output: one copy of
the hidden state per intervention, only the selected rows recomputed, positions never rebuilt from Python lists.

Gradient checkpointing. Recomputed layers call the hooks again during backward, after the forward has returned. The
hooks then use the state of the last grad-enabled forward (positions, R, dropout seeds: the same masks), so a backward
must follow its own forward before the next grad-enabled one (every training loop does). R's producer can be
backpropagated many times (``interventions._ReplayableGraph``), which reentrant checkpointing needs.

Generation. ``generate`` edits the prompt pass only: the hooks are active while the KV cache is empty and idle on the
decode steps (which see one new token each), exactly what re-running the edited prompt every step gives without a
cache. Beam search and ``num_return_sequences`` expand the batch; the locations are repeated to match.

Saving. ``save(dir)`` writes config.json (every hyperparameter, the positions spec, the model's shape) and
``interventions.safetensors``. ``ReftModel.load(dir, model)`` reads those, and also the directory formats registered
with ``register_directory_format``: ``reft_fast.compat`` registers pyreft's. This module never imports the compat
layer; the registry keeps the dependency one-way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from reft_fast import ops
from reft_fast.core.config import ReftConfig
from reft_fast.core.hf import hidden_size_of
from reft_fast.core.interventions import compute_rotations
from reft_fast.core.positions import check_locations, unit_locations_to_tensor

__all__ = ["ReftModel", "get_reft_model", "find_decoder_layers", "model_hidden_size", "register_directory_format",
           "LAYER_PATHS", "ATTENTION_NAMES", "MLP_NAMES"]

# Where decoder layer lists live, most common first (Llama/Mistral/Qwen/Gemma/Phi: model.layers; GPT-2: transformer.h;
# GPT-NeoX: gpt_neox.layers; OPT: model.decoder.layers; multimodal wrappers: model.language_model.layers).
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
               "model.language_model.layers", "model.model.layers", "transformer.layers", "transformer.blocks",
               "layers", "h", "decoder.layers")
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
_HIDDEN_KWARGS = ("hidden_states", "x", "input")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "interventions.safetensors"
FORMAT = "reft_fast"

# Other libraries' saved-directory formats that ``ReftModel.load`` also reads: name -> (recognizes(config) -> bool,
# load(reft_model_class, directory, config, model, *, backend, orthogonalization) -> ReftModel). Filled by the compat
# layer.
_DIRECTORY_FORMATS: dict = {}


def register_directory_format(name: str, recognizes, load) -> None:
    """Let ``ReftModel.load`` read another library's directories: ``recognizes`` gets the parsed config.json, ``load``
    gets (the ReftModel class to build, directory, config, model, backend=..., orthogonalization=...) and returns the
    ReftModel."""
    _DIRECTORY_FORMATS[name] = (recognizes, load)


# --------------------------------------------------------------------------------------------------------------------
# Finding the modules
# --------------------------------------------------------------------------------------------------------------------
def _get_path(root: nn.Module, path: str):
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list of a Hugging Face model and its attribute path, found by structure."""
    for path in LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ValueError(f"unsupported model structure: {type(model).__name__} has no decoder layer list at any of "
                     f"{list(LAYER_PATHS)} (an nn.ModuleList of decoder layers)")


def _child(layer: nn.Module, names: tuple, what: str, index: int) -> nn.Module:
    for name in names:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"unsupported model structure: decoder layer {index} ({type(layer).__name__}) has no {what} "
                     f"submodule named any of {list(names)}")


def model_hidden_size(model: nn.Module) -> int:
    """The decoder's hidden size: from the config, else from the input embeddings."""
    config = getattr(model, "config", None)
    size = hidden_size_of(config) if config is not None else None
    if size is not None:
        return size
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not hasattr(embeddings, "embedding_dim"):
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: no config.hidden_size and no input "
                         "embeddings")
    return embeddings.embedding_dim


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _intervention_key(layer: int, component: str, taken: dict) -> str:
    # pyvene's key format, so that pyreft's intkey_<key>.bin files map one to one.
    proposal = f"layer_{layer}_comp_{component}_unit_pos_nunit_1"
    taken[proposal] = taken.get(proposal, -1) + 1
    return f"{proposal}#{taken[proposal]}"


# --------------------------------------------------------------------------------------------------------------------
# Per-batch state read by the hooks
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    """What the hooks of one forward need, computed once before the base model runs."""

    locations: dict  # device -> int64 [n_interventions, B, P]
    rotations: list  # per intervention: R [r, d] or None
    seeds: list  # per intervention: dropout seed or None
    expandable: bool = False  # generate: beams / returned sequences repeat each example
    prompt_length: int = 0  # generate: the sequence length of the prompt the locations index
    enabled: bool = True  # generate: False on decode steps (KV cache already holds the edited prompt)
    _expanded: dict = field(default_factory=dict)

    def positions(self, index: int, device: torch.device, batch_size: int) -> torch.Tensor:
        locations = self.locations[device]
        if locations.shape[1] != batch_size:
            factor = batch_size // locations.shape[1]
            if not self.expandable or factor * locations.shape[1] != batch_size:
                raise ValueError(f"the hidden states have batch {batch_size} but the locations have batch "
                                 f"{locations.shape[1]}")
            key = (device, factor)
            if key not in self._expanded:
                self._expanded[key] = locations.repeat_interleave(factor, dim=1)
            locations = self._expanded[key]
        return locations[index]


# --------------------------------------------------------------------------------------------------------------------
# ReftModel
# --------------------------------------------------------------------------------------------------------------------
class ReftModel(nn.Module):
    """A frozen base model with ReFT interventions attached by hooks.

    Attributes: ``model`` (the base, all parameters requires_grad=False), ``interventions`` (nn.ModuleDict with
    pyvene's keys, in config order = the order of the locations), ``reft_config``.
    """

    def __init__(self, model: nn.Module, reft_config: ReftConfig, *, backend: Optional[str] = None):
        super().__init__()
        if isinstance(model, ReftConfig) and isinstance(reft_config, nn.Module):
            model, reft_config = reft_config, model  # pyreft's argument order: ReftModel(config, model)
        if not isinstance(reft_config, ReftConfig):
            raise TypeError(f"reft_config must be a reft_fast.ReftConfig, got {type(reft_config).__name__}")
        if backend not in (None, "auto") + ops.backend_names():
            raise ValueError(f"unknown backend {backend!r}; expected one of {list(ops.backend_names())} or None")
        self.model = model
        self.reft_config = reft_config
        self.backend = backend
        self.layers_path, layers = find_decoder_layers(model)
        self.hidden_size = model_hidden_size(model)
        for param in model.parameters():
            param.requires_grad_(False)

        self.interventions = nn.ModuleDict()
        self._placements: list[tuple[int, str]] = []
        sites: dict[tuple[int, str], list[int]] = {}
        taken: dict = {}
        for layer, component, intervention in reft_config.build(len(layers), self.hidden_size):
            key = _intervention_key(layer, component, taken)
            # Each intervention lives where its layer lives (models split over devices keep working).
            self.interventions[key] = intervention.to(_module_device(layers[layer]))
            sites.setdefault((layer, component), []).append(len(self._placements))
            self._placements.append((layer, component))

        self._batch: Optional[_Batch] = None  # the forward in progress
        self._grad_batch: Optional[_Batch] = None  # the last grad-enabled forward, for checkpoint recomputation
        self._handles = [model.register_forward_pre_hook(self._on_base_forward, with_kwargs=True)]
        for (layer, component), indices in sites.items():
            block = layers[layer]
            if component.startswith("block"):
                module = block
            elif component.startswith("attention"):
                module = _child(block, ATTENTION_NAMES, "attention", layer)
            else:
                module = _child(block, MLP_NAMES, "MLP", layer)
            if component.endswith("_input"):
                handle = module.register_forward_pre_hook(partial(self._input_hook, indices), with_kwargs=True)
            else:
                handle = module.register_forward_hook(partial(self._output_hook, indices))
            self._handles.append(handle)

    # ----------------------------------------------------------------------------------------------------------------
    # Hooks
    # ----------------------------------------------------------------------------------------------------------------
    def _active_batch(self) -> Optional[_Batch]:
        if self._batch is not None:
            return self._batch if self._batch.enabled else None
        # Inside a backward pass: a checkpointed layer being recomputed (reentrant or not) must redo its edit.
        if torch._C._current_graph_task_id() != -1:
            return self._grad_batch
        return None

    def _edit(self, indices: list, h: torch.Tensor, batch: _Batch) -> torch.Tensor:
        interventions = list(self.interventions.values())
        for i in indices:
            positions = batch.positions(i, h.device, h.shape[0])
            h = interventions[i].edit(h, positions, rotation=batch.rotations[i], seed=batch.seeds[i],
                                      backend=self.backend, validate=False)
        return h

    def _output_hook(self, indices, module, args, output):
        batch = self._active_batch()
        if batch is None:
            return None
        if isinstance(output, torch.Tensor):
            return self._edit(indices, output, batch)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return type(output)([self._edit(indices, output[0], batch), *output[1:]])
        raise TypeError(f"cannot intervene on the output of {type(module).__name__}: expected a tensor or a tuple "
                        f"starting with the hidden states, got {type(output).__name__}")

    def _input_hook(self, indices, module, args, kwargs):
        batch = self._active_batch()
        if batch is None:
            return None
        if args and isinstance(args[0], torch.Tensor):
            return (self._edit(indices, args[0], batch), *args[1:]), kwargs
        for name in _HIDDEN_KWARGS:
            if isinstance(kwargs.get(name), torch.Tensor):
                return args, {**kwargs, name: self._edit(indices, kwargs[name], batch)}
        raise TypeError(f"cannot find the hidden states among the inputs of {type(module).__name__} (first positional "
                        f"argument or one of {list(_HIDDEN_KWARGS)})")

    def _on_base_forward(self, module, args, kwargs):
        batch = self._batch
        if batch is None:
            # A plain call of the base model: no later recomputation may replay an older batch's edits.
            self._grad_batch = None
        elif batch.expandable:
            # generate: edit only while the prompt is processed; decode steps run the plain model.
            batch.enabled = _is_prompt_pass(args, kwargs, batch.prompt_length)
        return None

    def remove_hooks(self) -> None:
        """Detach from the base model (removes this ReftModel's hooks only)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ----------------------------------------------------------------------------------------------------------------
    # Parameters
    # ----------------------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The intervention parameters (the only ones an optimizer should get)."""
        return [p for p in self.interventions.parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        base_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        base_total = sum(p.numel() for p in self.model.parameters())
        print(f"trainable intervention params: {trainable:,d} || trainable model params: {base_trainable:,d}\n"
              f"model params: {base_total:,d} || trainable%: {100 * (trainable + base_trainable) / base_total}")

    # ----------------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------------
    def _prepare(self, base: dict, unit_locations, intervention_locations, *, expandable: bool) -> _Batch:
        if not isinstance(base, dict):
            raise TypeError(f"base must be a dict of model inputs (input_ids, attention_mask, ...), got "
                            f"{type(base).__name__}")
        inputs = base.get("input_ids", base.get("inputs_embeds"))
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
            raise ValueError("base must hold input_ids [batch, seq] (or inputs_embeds [batch, seq, hidden])")
        batch_size, seq_len = inputs.shape[:2]
        n = len(self.interventions)
        if (unit_locations is None) == (intervention_locations is None):
            raise ValueError("give the edited positions either as unit_locations={'sources->base': (None, nested)} or "
                             "as intervention_locations=<int tensor [n_interventions, batch, positions]>, not both")
        if unit_locations is not None:
            locations = unit_locations_to_tensor(unit_locations, n, batch_size)
        else:
            locations = intervention_locations
            check_locations(locations, n, batch_size)
        # Values are checked where reading them is free: on the CPU, once per batch, before the single transfer.
        if locations.device.type == "cpu":
            check_locations(locations, n, batch_size, seq_len=seq_len)
        locations = locations.long()
        by_device = {}
        for intervention in self.interventions.values():
            device = _module_device(intervention)
            if device not in by_device:
                by_device[device] = locations.to(device, non_blocking=True).contiguous()
        return _Batch(by_device, self._rotations(), self._seeds(), expandable=expandable, prompt_length=seq_len)

    def _rotations(self) -> list:
        """R for every rotation intervention, one batched call per (method, shape, device)."""
        groups: dict = {}
        interventions = list(self.interventions.values())
        for i, intervention in enumerate(interventions):
            if intervention.uses_rotation:
                key = (intervention.orthogonalization, intervention.low_rank_dimension, intervention.embed_dim,
                       _module_device(intervention))
                groups.setdefault(key, []).append(i)
        rotations = [None] * len(interventions)
        for (method, *_), members in groups.items():
            for i, R in zip(members, compute_rotations(method, [interventions[i].rotation_inputs() for i in members])):
                rotations[i] = R
        return rotations

    def _seeds(self) -> list:
        # Drawn once per forward so that a checkpoint recomputation regenerates the same dropout masks.
        return [ops._draw_seed() if intervention.training and intervention.dropout > 0 else None
                for intervention in self.interventions.values()]

    def forward(self, base: dict, unit_locations=None, *, intervention_locations: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, sources=None, subspaces=None,
                output_original_output: bool = False, **kwargs):
        """Run the base model with the interventions applied; returns ``(original_output or None, intervened_output)``.

        Args:
            base: the model inputs (input_ids, attention_mask, ...).
            unit_locations: pyreft's ``{"sources->base": (None, nested)}``, nested lists [intervention][example][pos].
            intervention_locations: the same as one int tensor [n_interventions, batch, P] (−1 = none).
            labels: passed to the base model, so ``intervened_output.loss`` is its LM loss.
            output_original_output: also run the base model without interventions (pyvene's flag).
            **kwargs: passed to the base model (e.g. use_cache=False).
        """
        if sources is not None:
            raise ValueError("sources are not supported: ReFT interventions are sourceless")
        if subspaces is not None:
            raise ValueError("subspaces are not supported: every intervention edits its full low-rank subspace")
        batch = self._prepare(base, unit_locations, intervention_locations, expandable=False)
        if labels is not None:
            kwargs["labels"] = labels
        original = None
        if output_original_output:
            with torch.no_grad():
                original = self.model(**base, **kwargs)
        self._batch = batch
        if torch.is_grad_enabled():
            self._grad_batch = batch
        try:
            output = self.model(**base, **kwargs)
        finally:
            self._batch = None
        return original, output

    @torch.no_grad()
    def generate(self, base: dict, unit_locations=None, *, intervention_locations: Optional[torch.Tensor] = None,
                 intervene_on_prompt: bool = True, sources=None, subspaces=None, output_original_output: bool = False,
                 **generate_kwargs):
        """``model.generate`` with the prompt pass edited; returns ``(original_ids or None, generated_ids)``.

        The locations index the prompt (as given in ``base``, left padding included). Decode steps use the KV cache
        of the edited prompt and run the plain model. Greedy, sampling and beam search all work.
        """
        if not intervene_on_prompt:
            raise ValueError("intervene_on_prompt=False is not supported: ReFT edits prompt positions only")
        if sources is not None or subspaces is not None:
            raise ValueError("sources and subspaces are not supported: ReFT interventions are sourceless")
        batch = self._prepare(base, unit_locations, intervention_locations, expandable=True)
        original = self.model.generate(**base, **generate_kwargs) if output_original_output else None
        self._batch = batch
        try:
            output = self.model.generate(**base, **generate_kwargs)
        finally:
            self._batch = None
        return original, output

    # ----------------------------------------------------------------------------------------------------------------
    # Save / load
    # ----------------------------------------------------------------------------------------------------------------
    def _model_signature(self) -> dict:
        config = getattr(self.model, "config", None)
        return {"class": type(self.model).__name__, "model_type": getattr(config, "model_type", None),
                "hidden_size": self.hidden_size, "num_layers": len(find_decoder_layers(self.model)[1])}

    def save(self, save_directory: Union[str, os.PathLike], *, save_to_hf_hub: bool = False,
             hf_repo_name: Optional[str] = None) -> None:
        """Write config.json (every hyperparameter) and interventions.safetensors; optionally push to the Hub."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for (key, intervention), (layer, component) in zip(self.interventions.items(), self._placements):
            entries.append({"key": key, "layer": layer, "component": component, **intervention.config_dict()})
        config = {"format": FORMAT, "format_version": 1, "interventions": entries,
                  "positions": self.reft_config.positions, "share_weights": self.reft_config.share_weights,
                  "model": self._model_signature()}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.interventions.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        if save_to_hf_hub:
            if not hf_repo_name:
                raise ValueError("save_to_hf_hub=True needs hf_repo_name")
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(hf_repo_name, exist_ok=True)
            api.upload_folder(folder_path=str(directory), repo_id=hf_repo_name)

    @classmethod
    def load(cls, load_directory: Union[str, os.PathLike], model: nn.Module, *, backend: Optional[str] = None,
             orthogonalization: str = "householder") -> "ReftModel":
        """Attach saved interventions to ``model``: a directory written by ``save``, or in a registered format
        (pyreft's, registered by ``reft_fast.compat``).

        Tensors are read on the CPU and copied to each intervention's device, so a directory saved on any device
        loads on any other. ``orthogonalization`` applies to pyreft directories (ours record it).
        """
        directory = Path(load_directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise ValueError(f"{directory} holds no {CONFIG_NAME}: not a saved ReFT model")
        config = json.loads(config_path.read_text())
        if config.get("format") == FORMAT:
            return cls._load_ours(directory, config, model, backend)
        for recognizes, load in _DIRECTORY_FORMATS.values():
            if recognizes(config):
                return load(cls, directory, config, model, backend=backend, orthogonalization=orthogonalization)
        raise ValueError(f"{config_path} is neither a reft_fast config (no 'format' key) nor one of "
                         f"{sorted(_DIRECTORY_FORMATS)}")

    @classmethod
    def _load_ours(cls, directory: Path, config: dict, model: nn.Module, backend) -> "ReftModel":
        from safetensors.torch import load_file

        saved = config["model"]
        _, layers = find_decoder_layers(model)
        actual = {"model_type": getattr(getattr(model, "config", None), "model_type", None),
                  "hidden_size": model_hidden_size(model), "num_layers": len(layers)}
        mismatched = {k: (saved.get(k), v) for k, v in actual.items() if saved.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {s!r}, model {m!r}" for k, (s, m) in mismatched.items())
            raise ValueError(f"the ReFT model in {directory} was saved for a different model ({details})")
        representations = []
        for entry in config["interventions"]:
            entry = dict(entry)
            representations.append({"layer": entry.pop("layer"), "component": entry.pop("component"),
                                    "intervention": {k: v for k, v in entry.items() if k != "key"}})
        reft_config = ReftConfig(representations, positions=config.get("positions"),
                                 share_weights=config.get("share_weights", False))
        reft_model = cls(model, reft_config, backend=backend)
        saved_keys = [entry["key"] for entry in config["interventions"]]
        if saved_keys != list(reft_model.interventions):
            raise ValueError(f"{directory}: saved intervention keys {saved_keys} do not match the rebuilt ones "
                             f"{list(reft_model.interventions)}")
        state = load_file(str(directory / WEIGHTS_NAME), device="cpu")
        reft_model.interventions.load_state_dict(state, strict=True)
        return reft_model


def _is_prompt_pass(args: tuple, kwargs: dict, prompt_length: int) -> bool:
    """Whether a forward call made by ``generate`` processes the prompt (to be edited) or decodes from the KV cache.

    The cache is recognized by what it is, not by the keyword it arrives under: transformers renamed it from
    ``past_key_values`` to ``cache`` in its generate loop (5.24.0, seen 2026-11-28), and a keyword-based check then
    edited every decode step. Without a recognizable cache (``use_cache=False``, or a cache of a kind unknown here),
    each call's input length tells: a cacheless step re-reads the whole sequence (at least the prompt), a decode step
    reads fewer tokens than the prompt.
    """
    for value in (*kwargs.values(), *args):
        cached = _cached_tokens(value)
        if cached is not None:
            return cached == 0
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if inputs is None:
        inputs = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return inputs is None or inputs.shape[1] >= prompt_length


def _cached_tokens(value) -> Optional[int]:
    """Tokens held by ``value`` if it is a KV cache (a transformers Cache, or legacy per-layer (key, value) tuples)."""
    if callable(getattr(value, "get_seq_length", None)):
        return int(value.get_seq_length())
    if (isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)) and len(value[0]) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in value[0])):
        return int(value[0][0].shape[-2])
    return None


def get_reft_model(model: nn.Module, reft_config: ReftConfig, set_device: bool = True,
                   disable_model_grads: bool = True, *, backend: Optional[str] = None) -> ReftModel:
    """pyreft's entry point: wrap ``model`` (frozen) with the interventions of ``reft_config``.

    Interventions are always placed on their layer's device (``set_device`` is accepted for pyreft compatibility) and
    the base is always frozen (``disable_model_grads=False`` is refused).
    """
    if not disable_model_grads:
        raise ValueError("disable_model_grads=False is not supported: reft_fast keeps the base model frozen")
    return ReftModel(model, reft_config, backend=backend)
