"""Reading a transformers config: the one place that knows where the language model's sizes live.

A multimodal config (Llava, Gemma 3, Qwen2-VL, ...) keeps the decoder's sizes in a text sub-config, reached through
``get_text_config()``; a plain causal-LM config answers that call with itself. Architectures also name the layer count
differently (``num_hidden_layers``, GPT-2's ``n_layer``, ``num_layers``).
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["text_config_of", "num_layers_of", "hidden_size_of"]

_LAYER_COUNT_NAMES = ("num_hidden_layers", "n_layer", "num_layers")


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
