"""The process group of a training job: joining it, its size, waiting for the other ranks, the one reduction helper, the
ranks' shares of an evaluation, and leaving it.

Collectives: every reduction of the training job goes through ``all_reduce_sum``, on the accelerator's device (NCCL
reduces no host tensors); the caller reads the result once, which is its one host sync.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

import torch

from reft_fast.ops.build_lock import (BUILD_LOCK_STALE_AFTER_S, StaleBuildLock, extension_build_lock,
                                      use_environment_ninja, wait_for_build_lock)

__all__ = ["BUILD_LOCK_STALE_AFTER_S", "StaleBuildLock", "all_reduce_sum", "announced_world_size", "barrier",
           "free_port", "init_distributed", "rank_chunks", "ranks", "same_on_every_rank", "share_cpu_cores",
           "shared_memory_op_build_lock", "shutdown", "wait_for_build_lock"]

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, for a world of one's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Join the process group the launcher prepared, or make a world of one (CPU, a single GPU, a notebook).

    ``timeout_minutes`` bounds every wait for the other ranks (joining, each collective): a rank that hangs makes the
    others fail with a timeout error instead of blocking the job forever.
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        share_cpu_cores()
        use_environment_ninja()  # every process builds the op with one ninja
        lock = shared_memory_op_build_lock()
        if lock is not None:  # joining builds or loads the op: a killed build's lock would hold it forever
            wait_for_build_lock(lock, users="job that uses DeepSpeed on CPUs")
            say_first_build(lock)
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        timeout = timedelta(minutes=timeout_minutes)
        # DeepSpeed makes its data-parallel and ZeRO groups with torch.distributed.new_group and no timeout, so they
        # would wait torch's default (30 min on gloo, 10 on NCCL) whatever init_distributed got: torch reads that
        # default from these module globals each time a group is made (DeepSpeed 0.19.8, torch 2.13, 2026-11-28).
        from torch.distributed import distributed_c10d

        distributed_c10d.default_pg_timeout = timeout
        if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
            distributed_c10d.default_pg_nccl_timeout = timeout
        deepspeed.init_distributed(verbose=False, timeout=timeout)
        _unname_shared_memory_once_mapped()
    return dist.get_rank(), dist.get_world_size()


def _unname_shared_memory_once_mapped() -> None:
    """On CPU ranks, remove the names of DeepSpeed's shared-memory allreduce buffers as soon as every rank has mapped
    every other's (``_remove_shared_memory_name``): a rank killed later (SIGKILL, a node's OOM killer, a cancelled
    job) then leaves nothing in /dev/shm, where each killed rank left 69 MB until the machine restarted. DeepSpeed's
    initialization returns on a rank once it has opened every other rank's buffer (a wait on the name), so after one
    barrier no rank opens a name again."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or not hasattr(os, "getuid"):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    _remove_shared_memory_name(dist.get_rank())


def share_cpu_cores() -> None:
    """On CPU ranks, each of a machine's ranks computes on its share of the cores unless ``OMP_NUM_THREADS`` says
    otherwise. torchrun sets OMP_NUM_THREADS=1 for several ranks per machine; DeepSpeed's launcher (0.19.8) sets it
    only with --bind_cores_to_rank, so each rank ran one thread per core of the machine and the ranks fought over
    them. The launchers announce the ranks per machine as LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (DeepSpeed)."""
    from deepspeed.accelerator import get_accelerator

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if "OMP_NUM_THREADS" in os.environ or local_ranks < 2 or get_accelerator().device_name() != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_ranks))


def shared_memory_op_build_lock() -> Optional[Path]:
    """The lock file of torch's extension loader for DeepSpeed's CPU shared-memory op, where joining the process group
    will build or load it now; None where it does not (another accelerator, the op prebuilt or loaded already).

    On the CPU accelerator DeepSpeed builds that op (``deepspeed_shm_comm``) as it joins the process group, a world of
    one included (deepspeed/comm/torch.py: ``build_shm_op``, 0.19.8); the name and that decision come from
    DeepSpeed's own builder, the directory as torch computes it (``reft_fast.ops.build_lock.extension_build_lock``)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.builder import OpBuilder

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    if installed_ops.get(builder.name, False) or builder.name in getattr(OpBuilder, "_loaded_ops", {}):
        return None  # prebuilt into the wheel, or loaded by this process already: the lock is not looked at
    return extension_build_lock(builder.name)


def say_first_build(lock: Path) -> None:
    """Rank 0 says why the first CPU run of an environment is silent for a minute or two: the build prints nothing
    until it ends (about 45 s on 2 idle cores, 2 minutes on busy ones, 2026-11-29), and a user who took the silence
    for a hang and pressed ctrl-C would leave the lock behind."""
    build_dir = lock.parent
    if os.environ.get("RANK", "0") == "0" and not (build_dir / f"{build_dir.name}.so").exists():
        logger.info("building DeepSpeed's CPU shared-memory op once in %s (a minute or two, printing nothing until "
                    "it ends)", build_dir)


def ranks(count: int) -> str:
    """``count`` ranks in a message: "1 rank", "2 ranks" (it was "saved by 1 ranks", "1 rank(s)")."""
    return f"{count} rank" if count == 1 else f"{count} ranks"


def announced_world_size() -> int:
    """The number of ranks, known before joining the process group: the launchers announce it in WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    """Wait for every rank (nothing to wait for outside a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def rank_chunks(total: int, micro: int, rank: int, world: int) -> Iterator[range]:
    """This rank's examples of each evaluation forward: chunks of ``micro * world`` consecutive examples of a set of
    ``total``, each rank taking its ``micro`` in rank order; one range per chunk, the same number on every rank.

    The range is empty for a rank with nothing left in the last chunk: it must still run a forward (on example 0,
    keeping nothing of it), because under ZeRO-3 every forward gathers parameters collectively and a rank that skips
    one hangs the others. The chunks do not depend on the rank count's remainder, so each example is in exactly one
    rank's ranges and its row can be written through a slice (``table[mine.start : mine.stop]``) and summed once
    over the ranks (``all_reduce_sum``)."""
    for start in range(0, total, micro * world):
        first = start + rank * micro
        yield range(min(first, total), min(first + micro, total))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all ranks, as a tensor on the accelerator's current device; every reduction of the
    training job goes through here.

    On GPUs DeepSpeed's process group is NCCL, which cannot reduce tensors in host memory ("No backend type associated
    with device type cpu"); gloo, on CPU machines, can, so a host tensor there would hide the bug until the first
    multi-GPU run. Reading the result (``.tolist()``) is the one host sync of the caller.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    values = values.to(get_accelerator().current_device_name())
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def same_on_every_rank(value: int) -> bool:
    """Whether every rank passed the same integer ``value`` (one reduction; every rank gets the same answer): the
    values are all equal exactly when world · Σv² = (Σv)². Summed in int64 (exact while world · v² < 2^63), compared
    as Python integers."""
    total, squares, world = all_reduce_sum(torch.tensor([value, value * value, 1], dtype=torch.int64)).tolist()
    return world * squares == total * total


def _remove_shared_memory_name(rank: int) -> None:
    """Remove the name of this rank's buffer of DeepSpeed's shared-memory allreduce, which DeepSpeed never removes.

    With every rank on one machine (the launcher's LOCAL_SIZE equal to the world size) and the CPU accelerator,
    DeepSpeed 0.19.8 maps a 69 MB file per rank in /dev/shm, ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_
    <MASTER_PORT>_<rank>``, and nothing unlinks it: each run of several CPU ranks left its memory behind (22 GB of
    /dev/shm after two days of this project's tests, 2026-11-29, when the kernel began killing processes). The name
    goes; the memory stays mapped, and is freed when the last process using it exits (a run started later in this
    process keeps using it: DeepSpeed creates the buffer once per process). Done once every rank has mapped the
    buffers (``init_distributed``), and again at ``shutdown`` for a process group made elsewhere."""
    if not hasattr(os, "getuid"):
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:  # none was made (NCCL, ranks on several machines), or not here
        pass


def shutdown(wait_for_others: bool = True) -> None:
    """Barrier, then tear down the process group (DeepSpeed on gloo sometimes aborts at exit otherwise).

    After a failure pass ``wait_for_others=False``: the other ranks may be gone or stuck, and a barrier would hold
    this one until the timeout instead of letting it exit (the launcher then stops the rest of the job).

    Through DeepSpeed's destroy_process_group, which also drops the groups DeepSpeed cached (its clone of the world
    group): with torch's alone, the next ``deepspeed.initialize`` in this process fails on the destroyed clone ("Group
    ... is not registered"; DeepSpeed 0.19.8, 2026-11-28).
    """
    import deepspeed.comm
    import torch.distributed as dist

    if dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        _remove_shared_memory_name(dist.get_rank())
        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        else:  # a group the launcher's code made, which DeepSpeed never joined
            dist.destroy_process_group()
