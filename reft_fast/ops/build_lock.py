"""Waiting for the lock of a C++ extension build of torch's loader (``torch.utils.cpp_extension.load``), and naming
it when a killed build left it.

The loader takes ``<build directory>/lock`` for each load of an extension, even one that finds nothing to build, and
removes it after; a process killed meanwhile (ctrl-C during a first run's build, a CI job cancelled mid-build) leaves
it, and every later load of that extension waits for it to go, forever and without a word (torch 2.13's FileBaton).
Two builds go through it: DeepSpeed's CPU shared-memory op, built as a CPU run joins its process group
(``reft_fast.train.distributed``), and reft-fast's own cuda backend and its CPU simulation (``reft_fast.ops
.cuda_build``). Both look at the lock first with ``wait_for_build_lock``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["BUILD_LOCK_STALE_AFTER_S", "LIVE_BUILD_QUIET_S", "StaleBuildLock", "extension_build_lock",
           "processes_holding", "use_environment_ninja", "wait_for_build_lock"]

logger = logging.getLogger(__name__)

# A lock that no process on this machine holds open is taken for a dead build's once it is this old: a build of
# DeepSpeed's shared-memory op takes about 45 s on 2 idle cores (DeepSpeed 0.19.8, torch 2.13, 2026-11-29) and one of
# the cuda backend about a minute, so 5 minutes leaves a build on another machine that shares the cache (a network
# home directory) time to finish on a busy one.
BUILD_LOCK_STALE_AFTER_S = 300.0
# A live build's lock is announced only once it has been waited for this long: the other ranks of a launch load the
# same op at the same moment, and an up-to-date op's load holds the lock for a few seconds (every two-rank CPU launch
# printed "waiting for process ..." before training started, 2026-11-30); a real build takes 45 s or more.
LIVE_BUILD_QUIET_S = 10.0


def use_environment_ninja() -> None:
    """Make the ninja of this Python's environment (the ``ninja`` package, a dependency) the one found first on PATH,
    for this process and every process it starts, where the environment has one: torch's extension loader builds
    with the ninja on PATH, and two ninja versions each take the other's build for out of date. A machine with its
    own ninja (1.11 beside the environment's 1.13 here) rebuilt DeepSpeed's CPU op, about a minute, every time a run
    of the activated environment followed one of ``.venv/bin/reft-fast`` or the other way round; without a ninja of
    its own, ``.venv/bin/reft-fast`` could not build it at all. Called before every build: by the command line, by
    ``reft_fast.train.distributed.init_distributed`` (DeepSpeed's op), by the cuda backend's build, and by the test
    suite for all its processes. Nothing changes where the environment has no ninja or it is already the one found."""
    scripts = Path(sys.executable).parent
    own = shutil.which("ninja", path=str(scripts))
    if own is None:
        return
    found = shutil.which("ninja")
    if found is not None and os.path.realpath(found) == os.path.realpath(own):
        return
    os.environ["PATH"] = os.pathsep.join(filter(None, [str(scripts), os.environ.get("PATH", "")]))


class StaleBuildLock(RuntimeError):
    """A lock file of torch's extension builder that a killed build left behind: every later build waits on it."""


def extension_build_lock(name: str) -> Path:
    """The lock file torch's loader takes to build or load the extension called ``name``: in its build directory,
    from torch's own function (``TORCH_EXTENSIONS_DIR``, or ``~/.cache/torch_extensions/<python>_<accelerator>``; a
    private function, the one place torch computes it), which creates the directory as the loader would."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / "lock"


def wait_for_build_lock(lock: Path, stale_after_s: float = BUILD_LOCK_STALE_AFTER_S, poll_s: float = 1.0, *,
                        users: str = "process that builds or loads it") -> None:
    """Return once ``lock``, a lock file of torch's extension loader, is gone; raise ``StaleBuildLock`` naming it and
    how to clear it when a killed build left it. ``users`` names who builds the extension, for the advice: "If no
    <users> is starting here, remove the file".

    The file holds nothing, so whose it is comes from who has it open: the builder keeps it open until it removes it. A
    process of this machine holding it is a live build: waited for, saying so after ``LIVE_BUILD_QUIET_S``. With none,
    the lock is a dead build's, unless a build on another machine sharing the directory holds it: that one ends within
    ``stale_after_s`` of the lock's creation, so until then the wait goes on, saying how to clear the lock, and after
    that the caller stops with the same advice. Nothing is removed here: removing a live build's lock would let a second
    build write over its files.
    """
    said = stale = None
    began = time.monotonic()
    while True:
        try:
            status = lock.stat()
        except FileNotFoundError:
            return
        holders = processes_holding(lock)
        what = f"torch's build of {lock.parent.name}"
        seen = "" if holders is not None else " that can be seen"
        if holders:
            pids = ", ".join(map(str, sorted(holders)))
            news = f"waiting for process {pids}, which holds the lock of {what} ({lock})"
        elif time.time() - status.st_mtime > stale_after_s:
            # Twice in a row, the same file: a builder closes the file a moment before it removes it.
            if stale == (status.st_ino, status.st_mtime):
                begun = time.strftime('%Y-%m-%d %H:%M', time.localtime(status.st_mtime))
                raise StaleBuildLock(
                    f"{lock} was left by {what} begun {begun} and stopped before it ended (ctrl-C or a killed "
                    f"process during a first run does that); no process{seen} here holds it, and torch would wait "
                    f"for it forever. {_clear_lock_advice(lock, holders, users)}")
            stale, news = (status.st_ino, status.st_mtime), said
        else:
            news = (f"{lock}, the lock of {what}, is held by no process of this machine{seen}: a build that was "
                    f"stopped left it, or a build on another machine holds it. Waiting for it until "
                    f"{time.strftime('%H:%M:%S', time.localtime(status.st_mtime + stale_after_s))}. "
                    f"{_clear_lock_advice(lock, holders, users)}")
        if news != said and (not holders or time.monotonic() - began >= LIVE_BUILD_QUIET_S):
            logger.warning("rank %s: %s", os.environ.get("RANK", "0"), news)
            said = news
        time.sleep(poll_s)


def _clear_lock_advice(lock: Path, holders: Optional[set[int]], users: str) -> str:
    where = "on another machine sharing this directory" if holders is not None else "here or on another machine"
    return (f"If no {users} is starting {where}, remove the file (rm {lock}) and run again: "
            f"{lock.parent.name} is then built anew.")


def processes_holding(path: Path) -> Optional[set[int]]:
    """The ids of this machine's processes that have ``path`` open, from /proc (None where there is no /proc)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = str(path.resolve())
    holders = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                holders.add(int(fd_dir.parent.name))
        except OSError:  # a process that ended meanwhile, or another user's
            continue
    return holders
