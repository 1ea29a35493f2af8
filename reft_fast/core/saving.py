"""Saving a ReftModel to a directory and loading it back, ours or in another library's registered format.

Our format: ``config.json`` (every intervention's hyperparameters with its layer, component and key, the positions
spec, and the model's shape it was trained on) and ``interventions.safetensors`` (the intervention state, CPU
tensors). Loading rebuilds the ReftConfig from config.json, refuses a model of another shape, and reads the tensors on
the CPU so that a directory saved on any device loads on any other.

In place. ``load_weights_in_place`` (``ReftModel.load_intervention``) loads a directory's weights into an existing
ReftModel's interventions without rebuilding them: our directories, and, through ``register_weights_format``, another
library's weights-only ones (pyreft's trainer checkpoints, which hold no config). Every tensor is first loaded into a
copy of the interventions on the meta device (keys and shapes checked, no memory used), so a directory that does not
match the model is refused before any weight changes.

Other formats. ``register_directory_format`` lets ``ReftModel.load`` read another library's directories:
``reft_fast.compat`` registers pyreft's. The core never imports the compat layer; the registry keeps the dependency
one-way.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from reft_fast.core.config import ReftConfig
from reft_fast.core.files import replace_atomically
from reft_fast.core.interventions import intervention_from_config
from reft_fast.core.hf import find_decoder_layers, model_hidden_size

__all__ = ["BASE_TRAINABLE_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "ReftLoadError", "read_weights",
           "register_directory_format", "register_weights_format", "save_reft_model", "load_reft_model",
           "load_weights_in_place", "check_on_meta_copy", "resolve_load_directory",
           "model_signature", "save_trainable_base", "load_trainable_base", "load_base_parameters",
           "trainable_base_state", "trainable_base_names", "check_base_parameters", "check_same_keys"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "interventions.safetensors"
BASE_TRAINABLE_NAME = "base_trainable.safetensors"  # the base's trained parameters (a head), next to the interventions
FORMAT = "reft_fast"
# An entry of config.json's "interventions" that is the same module as an earlier entry names that entry's key here.
SHARED_WITH = "shared_with"
# config.json's "format_version": 1, or 2 when an entry names another in SHARED_WITH (a reader of version 1 cannot
# tie them). A directory is written at the lowest version that describes it, so older readers keep reading the rest.
FORMAT_VERSION_SHARED = 2
READS_FORMAT_VERSIONS = (1, FORMAT_VERSION_SHARED)


class ReftLoadError(ValueError):
    """``ReftModel.load`` refuses the directory: it holds no loadable ReFT model (no or a damaged config.json or weights
    file, saved for another base, an unknown format). A ValueError, as these refusals always were; callers that turn
    a user's bad path into a plain message catch this class alone, so a bug's ValueError still shows its traceback."""


# name -> (recognizes(config) -> bool,
#          load(reft_model_class, directory, config, model, *, backend, orthogonalization, include_model)).
_DIRECTORY_FORMATS: dict[str, tuple[Callable, Callable]] = {}


def register_directory_format(name: str, recognizes: Callable, load: Callable) -> None:
    """Let ``ReftModel.load`` read another library's directories: ``recognizes`` gets the parsed config.json, ``load``
    gets (the ReftModel class to build, directory, config, model, backend=..., orthogonalization=...,
    include_model=...) and returns the ReftModel, having loaded the base's saved trainable parameters into ``model``
    when ``include_model`` is set."""
    _DIRECTORY_FORMATS[name] = (recognizes, load)


# name -> (recognizes(directory) -> bool, load_into(reft_model, directory, include_model=...)): weights-only formats
# that ``load_weights_in_place`` reads into an existing ReftModel.
_WEIGHTS_FORMATS: dict[str, tuple[Callable, Callable]] = {}


def register_weights_format(name: str, recognizes: Callable, load_into: Callable) -> None:
    """Let ``ReftModel.load_intervention`` read another library's weights into an existing ReftModel: ``recognizes``
    gets the directory (a Path), ``load_into`` gets (reft_model, directory, include_model=...) and loads every
    intervention (and, with ``include_model``, the base's saved trainable parameters), or raises ReftLoadError having
    changed nothing."""
    _WEIGHTS_FORMATS[name] = (recognizes, load_into)


def model_signature(model: nn.Module) -> dict:
    """What a saved ReFT model must match in the base it is loaded onto (the class is recorded, not checked)."""
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None),
            "hidden_size": model_hidden_size(model), "num_layers": len(find_decoder_layers(model)[1])}


def save_reft_model(reft_model, directory: Union[str, os.PathLike], *, save_to_hf_hub: bool = False,
                    hf_repo_name: Optional[str] = None, include_model: bool = False) -> None:
    """Write ``reft_model``'s config.json and interventions.safetensors into ``directory`` (with ``include_model``,
    also the base's trainable parameters: ``save_trainable_base``); optionally push it to the Hub as
    ``hf_repo_name``."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"cannot save the ReFT model into {directory}: it is a file, and a saved ReFT model is a "
                              "directory (config.json and its weights); give a directory path")
    directory.mkdir(parents=True, exist_ok=True)
    entries = _intervention_entries(reft_model)
    version = FORMAT_VERSION_SHARED if any(SHARED_WITH in entry for entry in entries) else 1
    config = {"format": FORMAT, "format_version": version, "interventions": entries,
              "positions": reft_model.reft_config.positions, "share_weights": reft_model.reft_config.share_weights,
              "model": model_signature(reft_model.model)}
    replace_atomically(directory / CONFIG_NAME, json.dumps(config, indent=2))  # as the weights: never torn by a kill
    _save_safetensors(_unshared_cpu_tensors(reft_model.interventions.state_dict()), directory / WEIGHTS_NAME)
    if not (include_model and save_trainable_base(reft_model.model, directory)):
        # An earlier save's base file would otherwise load with these interventions (load(..., include_model=True)).
        (directory / BASE_TRAINABLE_NAME).unlink(missing_ok=True)
    if save_to_hf_hub:
        if not hf_repo_name:
            raise ValueError("save_to_hf_hub=True needs hf_repo_name")
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(hf_repo_name, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=hf_repo_name)


def _intervention_entries(reft_model) -> list[dict]:
    """config.json's record of each intervention. One instance placed at several sites (weights shared, as pyreft
    allows) is described in full at its first key; each later key names that one in ``SHARED_WITH`` instead, so that
    loading ties them again rather than building independent copies that would train apart."""
    first_key: dict[int, str] = {}
    entries = []
    for (key, intervention), (layer, component) in zip(reft_model.interventions.items(), reft_model.placements):
        entry = {"key": key, "layer": layer, "component": component}
        if id(intervention) in first_key:
            entry[SHARED_WITH] = first_key[id(intervention)]
        else:
            first_key[id(intervention)] = key
            entry.update(intervention.config_dict())
        entries.append(entry)
    return entries


def _unshared_cpu_tensors(state: dict) -> dict:
    """``state`` on the CPU with a tensor that an earlier entry already holds copied: safetensors refuses shared
    memory, and one intervention instance given at several layers (as pyreft allows) appears once per key."""
    seen, tensors = set(), {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


def resolve_load_directory(load_directory: Union[str, os.PathLike], *, from_huggingface_hub: bool = False,
                           local_directory: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The local directory to load from: ``load_directory`` itself, or, when ``from_huggingface_hub`` is set or no
    such directory exists (pyvene's rule), the snapshot of the Hub repo of that id (``huggingface_hub``'s
    ``snapshot_download``: the cached copy, downloaded first when missing). A missing path that cannot be a repo id
    (``/abs/dir``, ``./dir``, ``a/b/c``) stays a local path, so its error says that it holds no saved model."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not from_huggingface_hub:
        try:
            validate_repo_id(os.fspath(load_directory))
        except HFValidationError:
            return Path(load_directory)
        if os.path.isdir(load_directory):
            return Path(load_directory)

    repo_id = os.fspath(load_directory)
    try:
        return Path(snapshot_download(repo_id=repo_id, local_dir=local_directory))
    except Exception as err:  # offline, unknown repo, invalid id, ...: all end the same way, with the cause attached
        where = "" if from_huggingface_hub else f"{repo_id} is not a local directory, and "
        raise ReftLoadError(f"cannot load a ReFT model: {where}downloading the Hugging Face Hub repo {repo_id!r} "
                            f"failed ({type(err).__name__}: {err}). Check the repo id, the network (HF_HUB_OFFLINE=1 "
                            "allows only repos already in the Hub cache) and access rights, or pass a local "
                            "directory") from err


def load_reft_model(reft_model_class: type, directory: Union[str, os.PathLike], model: nn.Module, *,
                    backend: Optional[str], orthogonalization: str, include_model: bool = False):
    """A ``reft_model_class`` (ReftModel or a subclass) on ``model`` with the interventions saved in ``directory``, in
    our format or a registered one; with ``include_model``, also the base's trainable parameters saved with them."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ReftLoadError(f"{directory} holds no {CONFIG_NAME}: not a saved ReFT model. A directory of weights alone "
                            "(a checkpoint of pyreft's trainer: intkey_*.bin) loads into a ReftModel built with the "
                            "config it was trained with: reft_model.load_intervention(directory)")
    config = _read_config(config_path)
    if config.get("format") == FORMAT:
        reft_model = _load_ours(reft_model_class, directory, config, model, backend)
        if include_model:
            load_trainable_base(model, directory)
        return reft_model
    for recognizes, load in _DIRECTORY_FORMATS.values():
        if recognizes(config):
            return load(reft_model_class, directory, config, model, backend=backend,
                        orthogonalization=orthogonalization, include_model=include_model)
    raise ReftLoadError(f"{config_path} is neither a reft_fast config (no 'format' key) nor one of "
                     f"{sorted(_DIRECTORY_FORMATS)}")


def _read_config(config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ReftLoadError(f"{config_path} is not valid JSON ({err}): not a saved ReFT model") from None
    if not isinstance(config, dict):
        raise ReftLoadError(f"{config_path} holds a JSON {type(config).__name__}, not an object: not a saved ReFT "
                            "model")
    version = config.get("format_version", 1)
    if config.get("format") == FORMAT and version not in READS_FORMAT_VERSIONS:
        raise ReftLoadError(f"{config_path} has format_version {version!r}, and this reft_fast reads versions "
                            f"{', '.join(map(str, READS_FORMAT_VERSIONS))}: it was written by a newer reft_fast; "
                            "upgrade reft_fast to load it")
    return config


def _load_ours(reft_model_class: type, directory: Path, config: dict, model: nn.Module, backend):
    saved, actual = config["model"], model_signature(model)
    mismatched = {k: (saved.get(k), actual[k]) for k in ("model_type", "hidden_size", "num_layers")
                  if saved.get(k) != actual[k]}
    if mismatched:
        details = ", ".join(f"{k}: saved {s!r}, model {m!r}" for k, (s, m) in mismatched.items())
        raise ReftLoadError(f"the ReFT model in {directory} was saved for a different model ({details})")
    reft_config = ReftConfig(_saved_representations(directory, config["interventions"]),
                             positions=config.get("positions"),
                             share_weights=config.get("share_weights", False))
    reft_model = reft_model_class(model, reft_config, backend=backend)
    saved_keys = [entry["key"] for entry in config["interventions"]]
    if saved_keys != list(reft_model.interventions):
        raise ReftLoadError(f"{directory}: saved intervention keys {saved_keys} do not match the rebuilt ones "
                            f"{list(reft_model.interventions)}")
    weights = directory / WEIGHTS_NAME
    try:
        reft_model.interventions.load_state_dict(read_weights(weights), strict=True)
    except RuntimeError as err:  # missing, unexpected or misshapen tensors: not the file its config.json describes
        raise ReftLoadError(f"{weights} does not hold the interventions {directory / CONFIG_NAME} describes: "
                            f"{err}") from None
    return reft_model


def _saved_representations(directory: Path, entries: list) -> list[dict]:
    """ReftConfig representations for config.json's intervention entries. An entry that shares an earlier one's
    module (``SHARED_WITH``) gets that very instance, built here; the others are built by the ReftConfig."""
    shared_keys = {entry[SHARED_WITH] for entry in entries if SHARED_WITH in entry}
    by_key: dict = {}
    representations = []
    for entry in entries:
        options = {k: v for k, v in entry.items() if k not in ("key", "layer", "component")}
        if SHARED_WITH in entry:
            if entry[SHARED_WITH] not in by_key:
                raise ReftLoadError(f"{directory / CONFIG_NAME}: intervention {entry['key']!r} shares the weights "
                                    f"of {entry[SHARED_WITH]!r}, which no earlier entry has")
            intervention = by_key[entry[SHARED_WITH]]
        elif entry["key"] in shared_keys:
            intervention = intervention_from_config(options)
        else:
            intervention = options
        by_key[entry["key"]] = intervention
        representations.append({"layer": entry["layer"], "component": entry["component"], "intervention": intervention})
    return representations


def load_weights_in_place(reft_model, directory: Union[str, os.PathLike], *, include_model: bool) -> None:
    """Load the weights saved in ``directory`` into ``reft_model``'s interventions, which must have the saved keys,
    types and shapes, and, with ``include_model``, the base's saved trainable parameters (if the directory has any):
    our directories or a registered weights format; all or nothing (ReftLoadError, nothing changed)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ReftLoadError(f"{directory} is not a directory: there are no interventions to load from it")
    config_path = directory / CONFIG_NAME
    if config_path.is_file():
        config = _read_config(config_path)
        if config.get("format") == FORMAT:
            _load_ours_in_place(reft_model, directory, config, include_model)
            return
    for recognizes, load_into in _WEIGHTS_FORMATS.values():
        if recognizes(directory):
            load_into(reft_model, directory, include_model=include_model)
            return
    raise ReftLoadError(f"{directory} holds neither a reft_fast {CONFIG_NAME} with its {WEIGHTS_NAME} nor the weights "
                        f"of a registered format ({sorted(_WEIGHTS_FORMATS)})")


# The hyperparameters that decide what the saved tensors mean; the others (dropout, act_fn, dtype) stay the model's.
_WEIGHT_DEFINING = ("type", "embed_dim", "low_rank_dimension", "orthogonalization", "add_bias")


def _load_ours_in_place(reft_model, directory: Path, config: dict, include_model: bool) -> None:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    saved = {entry["key"]: entry for entry in config.get("interventions") or []}
    check_same_keys(config_path, list(saved), list(reft_model.interventions))
    for key, intervention in reft_model.interventions.items():
        ours = intervention.config_dict()
        differ = {name: (saved[key][name], ours.get(name)) for name in _WEIGHT_DEFINING
                  if name in saved[key] and saved[key][name] != ours.get(name)}
        if differ:
            details = ", ".join(f"{name}: saved {s!r}, model {m!r}" for name, (s, m) in differ.items())
            raise ReftLoadError(f"{config_path}: intervention {key!r} does not match the model's ({details})")
    weights = read_weights(weights_path)
    check_on_meta_copy(reft_model.interventions, lambda staged: staged.load_state_dict(weights, strict=True),
                       weights_path)
    base_path = directory / BASE_TRAINABLE_NAME
    base = read_weights(base_path) if include_model and base_path.is_file() else {}
    check_base_parameters(reft_model.model, base, base_path)
    reft_model.interventions.load_state_dict(weights, strict=True)
    load_base_parameters(reft_model.model, base, base_path)


def check_same_keys(source, saved_keys: list, model_keys: list) -> None:
    """Refuse (ReftLoadError naming ``source``) saved interventions whose keys are not the model's."""
    missing = [key for key in model_keys if key not in saved_keys]
    extra = [key for key in saved_keys if key not in model_keys]
    if missing or extra:
        problems = ([f"the model's {missing} are missing"] if missing else []) + (
            [f"{extra} are not in the model"] if extra else [])
        raise ReftLoadError(f"{source} does not hold the model's interventions: {', and '.join(problems)} (the model's "
                            f"keys: {model_keys})")


def check_on_meta_copy(module: nn.Module, load: Callable[[nn.Module], None], source) -> None:
    """Run ``load`` on a copy of ``module`` whose tensors sit on the meta device (no memory, no values), so that a
    missing or unexpected key or a wrong shape is found before ``module`` itself is touched; such a complaint
    (RuntimeError or ValueError) becomes a ReftLoadError naming ``source``."""
    memo = {id(param): nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            for param in module.parameters()}
    memo.update({id(buffer): torch.empty_like(buffer, device="meta") for buffer in module.buffers()})
    staged = copy.deepcopy(module, memo)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*to a meta parameter")  # the copy is a no-op here, as meant
        try:
            load(staged)
        except ReftLoadError:
            raise
        except (RuntimeError, ValueError) as err:
            raise ReftLoadError(f"{source} does not match the model's interventions: {err}") from None


def read_weights(path: Path) -> dict:
    """The tensors of a saved safetensors file, on the CPU; a missing or unreadable file is a ReftLoadError naming
    it (a copy cut short, a file of another kind)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ReftLoadError(f"{path} is missing: the directory holds a ReFT config but not its weights")
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise ReftLoadError(f"{path} cannot be read ({err}): the file is damaged or not a safetensors file") from None


def trainable_base_state(model) -> dict:
    """{name: a CPU copy} of the base's parameters that train (requires_grad: a classifier head); empty when the base
    is wholly frozen. Copies: later steps do not change them."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


def save_trainable_base(model, directory) -> bool:
    """``trainable_base_state`` as ``BASE_TRAINABLE_NAME`` in ``directory``; nothing when the base is wholly
    frozen. Whether a file was written."""
    trainable = trainable_base_state(model)
    if trainable:
        _save_safetensors(trainable, Path(directory) / BASE_TRAINABLE_NAME)
    return bool(trainable)


def _save_safetensors(tensors: dict, path: Path) -> None:
    """Write ``tensors`` as a safetensors file with the permissions of any file written here (the umask's), whole or
    not at all. safetensors.torch.save_file 0.8 writes through a temporary file created with mode 0600 and renames it
    into place (safetensors issue #782, seen with 0.8.0 on 2026-11-29), so another user (a server, a container's user)
    could not load what was saved. These files are small (interventions, a head): serialized in memory and written
    through ``replace_atomically``, so a kill never leaves a torn one."""
    from safetensors.torch import save

    replace_atomically(path, save(tensors, metadata={"format": "pt"}))


def load_trainable_base(model, directory) -> list[str]:
    """Load ``save_trainable_base``'s file from ``directory`` into ``model`` (copied onto its parameters' devices and
    dtypes) and return the names loaded; none when the directory has no such file. A name the model lacks is an
    error: the file belongs to another architecture."""
    path = Path(directory) / BASE_TRAINABLE_NAME
    if not path.is_file():
        return []
    return load_base_parameters(model, read_weights(path), path)


def trainable_base_names(directory) -> list[str]:
    """The parameter names in ``save_trainable_base``'s file in ``directory``, read from its header (no tensor is
    loaded); none when there is no such file or it cannot be read (``load_trainable_base`` then says why)."""
    from safetensors import safe_open

    path = Path(directory) / BASE_TRAINABLE_NAME
    try:
        with safe_open(str(path), framework="pt") as weights:
            return sorted(weights.keys())
    except Exception:  # absent, cut short, not safetensors: whatever safetensors raises, the load reports it
        return []


def load_base_parameters(model, tensors: dict, path: Path) -> list[str]:
    """Copy ``tensors`` ({parameter name: tensor}, read from ``path``) onto ``model``'s parameters of those names and
    return the names; a name the model lacks is an error: the file belongs to another architecture."""
    check_base_parameters(model, tensors, path)
    model.load_state_dict(tensors, strict=False)
    return sorted(tensors)


def check_base_parameters(model, tensors: dict, path: Path) -> None:
    """Refuse (ReftLoadError naming ``path``) base parameters that ``model`` lacks or holds in another shape, before
    any is copied."""
    if not tensors:
        return
    own = model.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise ReftLoadError(f"{path}: parameters {unexpected} are not in {type(model).__name__}")
    misshapen = [f"{name} {list(tensor.shape)} (model {list(own[name].shape)})" for name, tensor in tensors.items()
                 if tuple(tensor.shape) != tuple(own[name].shape)]
    if misshapen:
        raise ReftLoadError(f"{path}: parameters of the wrong shape: {', '.join(misshapen)}")
