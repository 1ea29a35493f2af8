"""Writing a run's files so that a kill at any moment leaves either the old file or the new one, never a torn one.

A file goes through ``reft_fast.core.files.replace_atomically`` (scratch name, fsync, rename). A directory is
published the same way: written whole under a scratch name, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from reft_fast.core.files import fsync_dir, replace_atomically, write_durably

__all__ = ["fsync_dir", "publish_directory", "remove_atomically", "replace_atomically", "write_durably",
           "write_jsonl_atomically"]


def write_jsonl_atomically(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line into ``path`` (its folder made), through ``replace_atomically``: a kill leaves the
    previous file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def remove_atomically(path: Path) -> None:
    """Rename to a hidden scratch name, then delete: a kill midway never leaves a half-deleted directory under
    ``path``'s name."""
    scratch = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(scratch, ignore_errors=True)
    os.replace(path, scratch)
    shutil.rmtree(scratch, ignore_errors=True)


def publish_directory(written: Path, target: Path) -> None:
    """Move the complete directory ``written`` to ``target``, replacing an older one there. A kill leaves the old
    ``target``, the new one, or (between the removal and the rename, a moment) none, but never a partial one."""
    for path in written.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(written)
    if target.exists():
        remove_atomically(target)
    os.replace(written, target)
    fsync_dir(target.parent)
