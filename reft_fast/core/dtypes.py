"""Floating dtypes by name: the one table that the interventions, the training config, the engine and the memory plan
read, so that a name accepted in one place means the same dtype and size everywhere."""

from __future__ import annotations

import torch

__all__ = ["TORCH_DTYPES", "MODEL_DTYPES", "torch_dtype", "model_dtype", "bytes_per_element"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
# model.dtype of the training config: the base model's weights; "auto" keeps the dtype the checkpoint was saved in.
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")
# The memory plan cannot see a checkpoint's own dtype before loading it; released LLM checkpoints are 16-bit.
_AUTO_BYTES = 2


def torch_dtype(value) -> torch.dtype:
    """A torch floating dtype, or its name with or without the ``torch.`` prefix ("bfloat16", "torch.float32")."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype must be a torch floating dtype or one of {sorted(TORCH_DTYPES)}, got {value!r}")
    return TORCH_DTYPES[name]


def model_dtype(name: str):
    """model.dtype → what ``from_pretrained(dtype=...)`` takes: a torch dtype, or the string "auto"."""
    return name if name == "auto" else TORCH_DTYPES[name]


def bytes_per_element(name: str) -> int:
    """Bytes of one element of a model.dtype (``"auto"`` is counted as a 16-bit checkpoint)."""
    return _AUTO_BYTES if name == "auto" else TORCH_DTYPES[name].itemsize
