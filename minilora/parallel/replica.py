"""The replica interface: what the training loop asks of its replicas, and SingleProcess, its identity."""
import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

@dataclass
class CommStats:
    """Bytes this rank has sent into all-reduces: gradients (through DDP's hook) and the per-step scalars."""
    grad_bytes: int = 0                   # bytes of gradient buckets all-reduced
    grad_buckets: int = 0                 # hook calls (one per bucket per step)
    scalar_bytes: int = 0                 # bytes of the per-step scalars (token count, loss, tokens)

    def as_dict(self) -> dict:
        return asdict(self)

class SingleProcess:
    """What the training loop needs from its replicas, for one process: every method is the identity, so
    the loop written against this interface is the plain single-process loop.

        model           what to call forward on
        shard(idx)      this replica's part of a micro-batch's example indices
        total(*values)  each value summed over the replicas
        sync(now)       context for a micro-batch's backward: combine the gradients at its end if now
        barrier()       wait for every replica;   is_main: the one replica that writes files
        gathered(), optimizer_state(opt), load_optimizer_state, local: whole tensors for checkpoints and this
                        replica's part of them, where a `sharded` replica holds a part (minilora.parallel.fsdp)"""
    sharded = False

    def __init__(self, model: nn.Module):
        self.module, self.model = model, model
        self.rank, self.world_size = 0, 1
        self.stats = CommStats()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        return list(indices)

    def total(self, *values: float) -> float | tuple[float, ...]:
        return values[0] if len(values) == 1 else values

    def sync(self, now: bool):
        return contextlib.nullcontext()

    def barrier(self) -> None:
        pass

    def gathered(self):  # the module attributes hold whole tensors inside (here: always)
        return contextlib.nullcontext()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:  # with whole tensors
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def local(self, whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # this replica's part (here: all)
        return whole

    def report(self) -> dict:
        """{"world_size", "rank", "comm": CommStats as a dict} for TrainResult.extra."""
        return {"world_size": self.world_size, "rank": self.rank, "comm": self.stats.as_dict()}
