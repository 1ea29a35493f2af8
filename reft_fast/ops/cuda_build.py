"""Backend ``cuda``: the CUDA C++ kernels of ``csrc/``, built on first use with ``torch.utils.cpp_extension``.

``edit_forward`` and ``edit_backward`` are the launch functions that ``reft_fast.ops.backend_cuda`` adapts to the op's
backend contract (``reft_fast.ops.Backend``); the triton backend has the same two. Importing this module compiles
nothing; the first call builds the extension with ninja + nvcc for the GPU's own architecture (``-arch=sm_90`` on
Hopper) and torch caches the build under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), keyed by
the sources and flags, so later processes only load it. When the build cannot happen, :class:`CudaBackendUnavailable`
says what is missing.

With ``REFT_FAST_CUDA_SIM=1`` the same sources are built for the CPU instead, on top of ``csrc/sim`` (a fiber-based
stand-in for the CUDA runtime, see ``csrc/sim/cuda_sim.h``), and the backend takes CPU tensors: the CUDA kernels then
run, slowly but with their own indexing, barriers, warp shuffles and reductions, on machines without a GPU, the way
``TRITON_INTERPRET=1`` runs the Triton kernels. ``REFT_FAST_CUDA_SIM=asan`` builds that CPU version with
AddressSanitizer; the process must then start with the sanitizer runtime preloaded
(``LD_PRELOAD=$(c++ -print-file-name=libasan.so)``).

Every build or load first looks at the lock torch's loader takes in the build directory (``reft_fast.ops.build_lock``):
a lock that a killed build left would make the loader wait forever without a word. A live build's lock is waited for,
saying so; a dead build's raises :class:`~reft_fast.ops.build_lock.StaleBuildLock`, naming the file and how to clear
it. That error is deliberately not a :class:`CudaBackendUnavailable`: the backend is not missing anything, one file
is in the way, and a caller that turns "unavailable" into skipping the backend or taking another must not do so
quietly here (the command line reports it as it reports the same lock of DeepSpeed's op: the message, exit 1).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from reft_fast.ops.build_lock import StaleBuildLock, extension_build_lock, use_environment_ninja, wait_for_build_lock

__all__ = ["CSRC_DIR", "ROWS_ENV", "SIM_ENV", "SOURCES", "CudaBackendUnavailable", "StaleBuildLock", "edit_backward",
           "edit_forward", "load", "rows_per_block", "simulated_extension_name", "simulation",
           "translate_launches", "unavailable_reason"]

# A source checkout has csrc/ beside reft_fast/; a wheel installs it as reft_fast/csrc/.
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
CSRC_DIR = next((p for p in (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "csrc") if p.is_dir()),
                _PACKAGE_DIR.parent / "csrc")
SOURCES = ("binding.cpp", "edit_forward.cu", "edit_backward.cu")
SIM_SOURCES = ("sim/cuda_sim.h", "sim/cuda_sim.cpp", "sim/include/cuda_runtime.h", "sim/include/cuda_fp16.h",
               "sim/include/cuda_bf16.h", "sim/include/mma.h")
# nvcc flags of the build (besides -arch). -fmad=false: nvcc may not fuse a * b + c into one fma on its own, so every
# fused multiply-add is an fmaf written in csrc/ and everything else is rounded as written. Left to nvcc, contraction
# depends on the code around an expression: it fused grad_out · dropout + (dz W − t P) in the four-rows-per-block
# backward and not in the one-row one, and fp32 grad_h differed in the last bit between them (csrc/README.md).
NVCC_FLAGS = ("-O3", "-fmad=false")
SIM_ENV = "REFT_FAST_CUDA_SIM"
ROWS_ENV = "REFT_FAST_CUDA_ROWS_PER_BLOCK"

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_extensions: dict = {}  # mode ("cuda", "sim" or "asan") -> loaded module


def simulation() -> Optional[str]:
    """``"sim"`` or ``"asan"`` when REFT_FAST_CUDA_SIM asks for the CPU build of the kernels, else None."""
    value = os.environ.get(SIM_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return None
    if value in ("1", "true", "yes", "on", "sim"):
        return "sim"
    if value == "asan":
        return "asan"
    raise ValueError(f"{SIM_ENV}={os.environ[SIM_ENV]!r}: expected 1 (CPU simulation), asan, or 0")


class CudaBackendUnavailable(RuntimeError):
    """The cuda backend cannot be built or loaded on this machine; the message names what is missing."""


def unavailable_reason() -> Optional[str]:
    """What stops the backend from building here (torch without CUDA, no GPU, no nvcc, no ninja, no sources), or None.

    Cheap: inspects torch, the toolchain and the files; compiles nothing. Under REFT_FAST_CUDA_SIM it checks what the
    CPU build needs instead (a C++ compiler, ninja, the sources and csrc/sim).
    """
    from torch.utils import cpp_extension

    if simulation() is not None:
        return _sim_unavailable_reason()
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
    use_environment_ninja()  # the environment's, where it has one: the one its builds use
    if not cpp_extension.is_ninja_available():
        missing.append("ninja was not found: pip install ninja")
    absent = [name for name in SOURCES if not (CSRC_DIR / name).is_file()]
    if absent:
        missing.append(f"the CUDA sources {absent} are not in {CSRC_DIR} (use a source checkout of reft-fast)")
    return "; ".join(missing) or None


def _sim_unavailable_reason() -> Optional[str]:
    from torch.utils import cpp_extension

    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which((shlex.split(compiler) or ["c++"])[0]) is None:  # e.g. "ccache g++": the first word runs
        missing.append(f"the C++ compiler {compiler!r} was not found (install g++ or set CXX)")
    use_environment_ninja()  # the environment's, where it has one: the one its builds use
    if not cpp_extension.is_ninja_available():
        missing.append("ninja was not found: pip install ninja")
    absent = [name for name in SOURCES + SIM_SOURCES if not (CSRC_DIR / name).is_file()]
    if absent:
        missing.append(f"the sources {absent} are not in {CSRC_DIR} (use a source checkout of reft-fast)")
    return "; ".join(missing) or None


def load():
    """The compiled extension, built on the first call (about a minute) and cached by torch afterwards.

    Which build depends on REFT_FAST_CUDA_SIM at the time of the call (the GPU one, or the CPU simulation). Raises
    CudaBackendUnavailable when it cannot be built here, and StaleBuildLock when a killed build's lock is in the way."""
    mode = simulation() or "cuda"
    if mode not in _extensions:
        with _lock:
            if mode not in _extensions:
                _extensions[mode] = _build() if mode == "cuda" else _build_simulated(sanitize=mode == "asan")
    return _extensions[mode]


def _build():
    reason = unavailable_reason()
    if reason is not None:
        raise CudaBackendUnavailable(f"backend 'cuda' is unavailable: {reason}")
    from torch.utils.cpp_extension import load as load_extension

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    _wait_for_build_lock(f"reft_fast_cuda_{arch}")
    _log.info("building the reft_fast cuda backend for %s (first use; cached afterwards)", arch)
    try:
        # An explicit -arch keeps torch from adding its own -gencode list (it scans the flags for "arch").
        return load_extension(
            name=f"reft_fast_cuda_{arch}",
            sources=[str(CSRC_DIR / name) for name in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=[*NVCC_FLAGS, f"-arch={arch}"],
        )
    except Exception as error:  # compiler, linker or loader failure: keep the cause, say where it came from
        raise CudaBackendUnavailable(f"building the reft_fast cuda backend for {arch} failed: {error}") from error


def _wait_for_build_lock(name: str) -> Path:
    """Wait while a live build holds the lock of the extension ``name``; raise StaleBuildLock for a dead build's. Out of
    the builds' ``try``: the error must reach the caller as itself, not as CudaBackendUnavailable (module docstring).
    Returns the lock's path (in the extension's build directory). (The environment's ninja was put first on PATH by
    the availability check each build makes before this.)"""
    lock = extension_build_lock(name)
    wait_for_build_lock(lock, users="process that uses reft-fast's cuda backend")
    return lock


# `kernel<<<grid, block, shared, stream>>>(` with the kernel named by a (qualified, possibly templated) identifier.
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def translate_launches(source: str) -> str:
    """A .cu source with every ``kernel<<<config>>>(args)`` rewritten as
    ``::cuda_sim::Launch(config).run(kernel, args)``, for the CPU build; line breaks inside a launch are kept, so line
    numbers still match the .cu file. Raises if a launch is left untranslated."""

    def rewrite(m):
        breaks = "\n" * m.group(0).count("\n")
        return f"::cuda_sim::Launch({' '.join(m.group(2).split())}).run({m.group(1)}, {breaks}"

    out = _LAUNCH.sub(rewrite, source)
    if "<<<" in out:
        line = out[: out.index("<<<")].count("\n") + 1
        raise CudaBackendUnavailable(f"a kernel launch at line {line} is not of the form cuda_sim can translate")
    return out


def _write_if_changed(path: Path, text: str) -> None:
    # An unchanged file keeps its mtime, so ninja does not rebuild it; a changed one is replaced atomically, so a
    # concurrent build never reads half a file.
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def simulated_extension_name(*, sanitize: bool = False) -> str:
    """The name torch's loader builds the CPU simulation under (its directory in ``TORCH_EXTENSIONS_DIR``). One build
    per checkout: the translated sources carry this checkout's paths, and two checkouts building at once must not
    overwrite each other's."""
    import hashlib

    checkout = hashlib.sha256(str(CSRC_DIR.resolve()).encode()).hexdigest()[:10]
    return f"reft_fast_cuda_sim{'_asan' if sanitize else ''}_{checkout}"


def _build_simulated(*, sanitize: bool):
    reason = _sim_unavailable_reason()
    if reason is not None:
        raise CudaBackendUnavailable(f"backend 'cuda' cannot be built for the CPU simulation: {reason}")
    from torch.utils.cpp_extension import load as load_extension

    name = simulated_extension_name(sanitize=sanitize)
    lock = _wait_for_build_lock(name)  # before the translated sources are written: a live build may be reading them
    # Beside the build directory, so TORCH_EXTENSIONS_DIR moves the sources with the build.
    source_dir = lock.parent.with_name(f"{name}_sources")
    source_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC_DIR / "binding.cpp"), str(CSRC_DIR / "sim" / "cuda_sim.cpp")]
    for cu in (n for n in SOURCES if n.endswith(".cu")):
        translated = source_dir / (Path(cu).stem + ".cpp")
        text = translate_launches((CSRC_DIR / cu).read_text(encoding="utf-8"))
        _write_if_changed(translated, f'#line 1 "{CSRC_DIR / cu}"\n' + text)
        sources.append(str(translated))
    # No strict aliasing: the vector paths pun through uint4, as CUDA code does. Hidden visibility: the __shared__
    # statics and the fiber entry stay private to this module, even beside another build of it in one process.
    # No contraction either, as nvcc's -fmad=false (NVCC_FLAGS): a * b + c stays two roundings on an FMA-capable CPU.
    cflags = ["-O2", "-fno-strict-aliasing", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-ffp-contract=off",
              "-DREFT_FAST_CUDA_SIM"]
    ldflags = []
    if sanitize:
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1"]
        ldflags += ["-fsanitize=address"]
    _log.info("building the reft_fast cuda backend for the CPU simulation%s (first use; cached afterwards)",
              " with AddressSanitizer" if sanitize else "")
    try:
        # The stand-in CUDA headers first; csrc/ for the translated sources' own includes.
        return load_extension(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags,
                              extra_include_paths=[str(CSRC_DIR / "sim" / "include"), str(CSRC_DIR)])
    except Exception as error:
        raise CudaBackendUnavailable(f"building the reft_fast cuda backend for the CPU simulation failed: {error}") \
            from error


def _stream(t: torch.Tensor) -> int:
    if t.device.type != "cuda":  # the CPU simulation has no streams (the binding checks the device)
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def _int64(positions: torch.Tensor) -> torch.Tensor:
    # ops accepts any integer dtype; the kernels read int64.
    return positions if positions.dtype == torch.int64 else positions.to(torch.int64)


def rows_per_block() -> int:
    """REFT_FAST_CUDA_ROWS_PER_BLOCK: slots per block of the rows kernels. 0 (default): chosen from the shape; 1: one;
    4: four where the padded rank is ≤ 8; 16: the tensor-core tile kernels where h is 16-bit and the GPU is sm_80+
    (the simulation counts as sm_90). For timing one choice against another; see csrc/README.md."""
    value = os.environ.get(ROWS_ENV, "").strip() or "0"
    if value not in ("0", "1", "4", "16"):
        raise ValueError(f"{ROWS_ENV}={value!r}: expected 0 (from the shape), 1, 4 or 16")
    return int(value)


def edit_forward(h, positions, Q, P, W, b, act: int, dropout: float, seed: int, out) -> None:
    """Overwrite ``out[b, positions[b, j]]`` (out is a copy of h) with ``dropout(h + δQ)``; see reft_fast.ops."""
    load().edit_forward(h, _int64(positions), Q, P, W, b, int(act), float(dropout), int(seed), out, _stream(h),
                        rows_per_block())


def edit_backward(h_rows, grad_out, positions, Q, P, W, b, act: int, dropout: float, seed: int, grad_h):
    """Overwrite ``grad_h`` (a copy of grad_out) at the selected rows; return fp32 ``(dQ, dP, dW, db)``.

    h_rows [B, n, d] is the compact copy of the selected rows of h (reft_fast.ops.selected_rows)."""
    return load().edit_backward(h_rows, grad_out, _int64(positions), Q, P, W, b, int(act), float(dropout),
                                int(seed), grad_h, _stream(grad_out), rows_per_block())
