"""The process group: rank, world size and timeouts under torchrun, one process being rank 0 of 1 (machinery)."""
import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "MINILORA_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds a collective may wait for the other ranks
_timeout: float | None = None  # the timeout init_from_env gave the process group


class DistributedError(RuntimeError):
    """A collective failed: another rank died or did not answer within the timeout."""


def lost_message(what: str, cause: BaseException) -> str:  # what a rank reports when a collective fails
    waited = f"{_timeout:g} s (${TIMEOUT_ENV})" if _timeout else "the process group's timeout"
    return (f"minilora.parallel: rank {rank()} of {world_size()}: {what} failed: another rank has stopped, or "
            f"has not answered within {waited}. Checkpoints already written are intact; rerun with --resume "
            f"(train(..., resume=True)) to continue from the last one. Cause: {str(cause).strip()[:300]}")


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, the one that writes files and prints; True in a single process."""
    return rank() == 0


def timeout_seconds(timeout: float | None = None) -> float:
    """timeout, else $MINILORA_DIST_TIMEOUT, else DEFAULT_TIMEOUT; must be > 0."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        timeout = timeout if timeout is not None else float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    return float(timeout)


def init_from_env(backend: str | None = None, timeout: float | None = None) -> bool:
    """Join the process group of torchrun's environment (RANK, WORLD_SIZE, ...); False in a single process or
    when a group exists. backend: NCCL with CUDA (each rank then takes GPU LOCAL_RANK as "cuda"), else gloo.
    A collective that waits longer than `timeout` seconds (default: timeout_seconds()) raises."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    seconds = timeout_seconds(timeout)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    global _timeout
    _timeout = seconds
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of a batch's example indices: indices[rank::world_size].

    Together the ranks hold every index exactly once, so N ranks see the examples one process sees."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if len(indices) < world_size:
        raise ValueError(f"a batch of {len(indices)} examples cannot give each of {world_size} ranks one; "
                         f"use batch_size >= {world_size}")
    return list(indices)[rank::world_size]
