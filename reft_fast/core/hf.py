"""Hugging Face models and configs: the one place that knows where a model's layers and sizes live.

Layers are found by structure, not by a table per architecture: the first non-empty ``nn.ModuleList`` at one of the
usual attribute paths (``LAYER_PATHS`` for decoders; for encoders ``ENCODER_LAYER_PATHS``, under the task model's
backbone, which transformers names in ``base_model_prefix``: ``roberta.encoder.layer`` in
RobertaForSequenceClassification, ``encoder.layer`` in a bare RobertaModel), and inside a layer the attention and MLP
submodules by their usual names (``ATTENTION_NAMES``, ``MLP_NAMES``).

Configs. A multimodal config (Llava, Gemma 3, Qwen2-VL, ...) keeps the decoder's sizes in a text sub-config, reached
through ``get_text_config()``; a plain causal-LM config answers that call with itself. Architectures also name the
layer count differently (``num_hidden_layers``, GPT-2's ``n_layer``, ``num_layers``).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

__all__ = ["text_config_of", "num_layers_of", "hidden_size_of", "head_dim_of", "model_hidden_size",
           "find_decoder_layers", "component_module", "LAYER_PATHS", "ENCODER_LAYER_PATHS", "ATTENTION_NAMES",
           "MLP_NAMES"]

# Where decoder layer lists live, most common first (Llama/Mistral/Qwen/Gemma/Phi: model.layers; GPT-2: transformer.h;
# GPT-NeoX: gpt_neox.layers; OPT: model.decoder.layers; multimodal wrappers: model.language_model.layers).
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
               "model.language_model.layers", "model.model.layers", "transformer.layers", "transformer.blocks",
               "layers", "h", "decoder.layers")
# Where encoder layer lists live inside the backbone (BERT, RoBERTa, XLM-R, DeBERTa, ELECTRA: encoder.layer; DistilBERT:
# transformer.layer).
ENCODER_LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers")
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
_LAYER_COUNT_NAMES = ("num_hidden_layers", "n_layer", "num_layers")


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------
def text_config_of(config: Any) -> Any:
    """The config describing the language model: the text sub-config of a multimodal config, else ``config``."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if get_text_config is not None else config


def num_layers_of(config: Any) -> Optional[int]:
    """Number of decoder layers named in the config, or None when it names none."""
    text = text_config_of(config)
    for name in _LAYER_COUNT_NAMES:
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    return None


def hidden_size_of(config: Any) -> Optional[int]:
    """The decoder's hidden size named in the config, or None when it names none."""
    size = getattr(text_config_of(config), "hidden_size", None)
    return size if isinstance(size, int) else None


def head_dim_of(config: Any) -> Optional[int]:
    """The width of one attention head: the config's ``head_dim`` where it names one (Gemma, Qwen3 set it apart from
    the hidden size), else hidden size / attention heads; None when the config tells neither."""
    text = text_config_of(config)
    head_dim = getattr(text, "head_dim", None)
    if isinstance(head_dim, int):
        return head_dim
    hidden, heads = hidden_size_of(config), getattr(text, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------
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


def _get_path(root: nn.Module, path: str):
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _backbone_prefix(model: nn.Module) -> str:
    """The attribute holding a task model's backbone (``roberta`` in RobertaForSequenceClassification); '' when the
    model is the backbone itself (a bare RobertaModel names the same prefix but has no such attribute)."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if isinstance(prefix, str) and isinstance(getattr(model, prefix, None), nn.Module) else ""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The layer list of a Hugging Face model (a decoder's, or an encoder's) and its attribute path, found by
    structure."""
    prefix = _backbone_prefix(model)
    encoder_paths = tuple(f"{prefix}.{path}" if prefix else path for path in ENCODER_LAYER_PATHS)
    for path in LAYER_PATHS + encoder_paths:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ValueError(f"unsupported model structure: {type(model).__name__} has no decoder layer list at any of "
                     f"{list(LAYER_PATHS)} and no encoder layer list at any of {list(encoder_paths)} (an "
                     "nn.ModuleList of layers)")


def component_module(block: nn.Module, component: str, index: int) -> nn.Module:
    """The module a component hooks in layer ``index`` (``block``): the layer itself for ``block_*``, its
    attention for ``attention_*``, its MLP for ``mlp_*``."""
    if component.startswith("block"):
        return block
    names, what = (ATTENTION_NAMES, "attention") if component.startswith("attention") else (MLP_NAMES, "MLP")
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"unsupported model structure: layer {index} ({type(block).__name__}) has no {what} "
                     f"submodule named any of {list(names)}")
