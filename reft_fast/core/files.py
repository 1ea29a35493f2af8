"""Writing a file so that a kill at any moment leaves either the old file or the new one, never a torn one.

The file is written under a hidden scratch name in the same directory, fsynced, and renamed over its target
(``os.replace`` is atomic on POSIX file systems); the directory is fsynced after, so the rename itself survives a
machine crash. A write that fails midway (a full disk) removes its scratch file and leaves the target as it was.
Shared by the saved ReFT files (``core.saving``) and a run's files (``train.files``, which also publishes
directories).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["fsync_dir", "replace_atomically", "write_durably"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(path: Path, data: Union[bytes, str]) -> None:
    """``path`` holds ``data`` afterwards; until the rename it holds what it held before (or does not exist). The
    file is created as any new file is (the umask's permissions)."""
    scratch = path.with_name(f".{path.name}.tmp")
    try:
        write_durably(scratch, data.encode() if isinstance(data, str) else data)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    fsync_dir(path.parent)
