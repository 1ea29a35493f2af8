"""Backend ``cuda``: the CUDA C++ kernels of ``csrc/``, built on first use with ``torch.utils.cpp_extension``.

``edit_forward`` and ``edit_backward`` are the two launch functions of the fused-backend contract that
``reft_fast.ops._FusedEdit`` calls (the triton backend has the same two). Importing this module compiles nothing; the
first call builds the extension with ninja + nvcc for the GPU's own architecture (``-arch=sm_90`` on Hopper) and torch
caches the build under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), keyed by the sources and flags,
so later processes only load it. When the build cannot happen, :class:`CudaBackendUnavailable` says what is missing.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

__all__ = ["CSRC_DIR", "SOURCES", "CudaBackendUnavailable", "edit_backward", "edit_forward", "load",
           "unavailable_reason"]

# A source checkout has csrc/ beside reft_fast/; a wheel installs it as reft_fast/csrc/.
CSRC_DIR = next((p for p in (Path(__file__).resolve().parent.parent / "csrc", Path(__file__).resolve().parent / "csrc")
                 if p.is_dir()), Path(__file__).resolve().parent.parent / "csrc")
SOURCES = ("binding.cpp", "edit_forward.cu", "edit_backward.cu")

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_extension = None


class CudaBackendUnavailable(RuntimeError):
    """The cuda backend cannot be built or loaded on this machine; the message names what is missing."""


def unavailable_reason() -> Optional[str]:
    """What stops the backend from building here (torch without CUDA, no GPU, no nvcc, no ninja, no sources), or None.

    Cheap: inspects torch, the toolchain and the files; compiles nothing.
    """
    from torch.utils import cpp_extension

    missing = []
    if torch.version.cuda is None:
        missing.append(f"this torch ({torch.__version__}) is built without CUDA")
    elif not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    # torch leaves CUDA_HOME unset when it has no CUDA itself; then look on PATH so the message stays accurate.
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = Path(cuda_home) / "bin" / "nvcc" if cuda_home is not None else shutil.which("nvcc")
    if nvcc is None or not Path(nvcc).exists():
        missing.append("nvcc was not found: install the CUDA toolkit matching torch.version.cuda, or set CUDA_HOME")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja was not found: pip install ninja")
    absent = [name for name in SOURCES if not (CSRC_DIR / name).is_file()]
    if absent:
        missing.append(f"the CUDA sources {absent} are not in {CSRC_DIR} (use a source checkout of reft-fast)")
    return "; ".join(missing) or None


def load():
    """The compiled extension, built on the first call (about a minute) and cached by torch afterwards."""
    global _extension
    if _extension is None:
        with _lock:
            if _extension is None:
                _extension = _build()
    return _extension


def _build():
    reason = unavailable_reason()
    if reason is not None:
        raise CudaBackendUnavailable(f"backend 'cuda' is unavailable: {reason}")
    from torch.utils.cpp_extension import load as load_extension

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    _log.info("building the reft_fast cuda backend for %s (first use; cached afterwards)", arch)
    try:
        # An explicit -arch keeps torch from adding its own -gencode list (it scans the flags for "arch").
        return load_extension(
            name=f"reft_fast_cuda_{arch}",
            sources=[str(CSRC_DIR / name) for name in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", f"-arch={arch}"],
        )
    except Exception as error:  # compiler, linker or loader failure: keep the cause, say where it came from
        raise CudaBackendUnavailable(f"building the reft_fast cuda backend for {arch} failed: {error}") from error


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _int64(positions: torch.Tensor) -> torch.Tensor:
    # ops accepts any integer dtype; the kernels read int64.
    return positions if positions.dtype == torch.int64 else positions.to(torch.int64)


def edit_forward(h, positions, Q, P, W, b, act: int, dropout: float, seed: int, out) -> None:
    """Overwrite ``out[b, positions[b, j]]`` (out is a copy of h) with ``dropout(h + δQ)``; see reft_fast.ops."""
    load().edit_forward(h, _int64(positions), Q, P, W, b, int(act), float(dropout), int(seed), out, _stream(h))


def edit_backward(h_rows, grad_out, positions, Q, P, W, b, act: int, dropout: float, seed: int, grad_h):
    """Overwrite ``grad_h`` (a copy of grad_out) at the selected rows; return fp32 ``(dQ, dP, dW, db)``.

    h_rows [B, n, d] is the compact copy of the selected rows of h (reft_fast.ops.selected_rows)."""
    return load().edit_backward(h_rows, grad_out, _int64(positions), Q, P, W, b, int(act), float(dropout),
                                int(seed), grad_h, _stream(grad_out))
