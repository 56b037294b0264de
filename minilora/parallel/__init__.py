"""Training on several processes: the replica interface, DDP over the adapters, FSDP (parallel.fsdp).

replica.py: what the trainer asks of its replicas (SingleProcess: one process); ddp.py: DataParallel under
torchrun; fsdp.py: every tensor sharded across the ranks (imported on its own: it needs torch.distributed.fsdp);
process_group.py: rank, world size and timeouts (machinery)."""
from .process_group import (DEFAULT_TIMEOUT, TIMEOUT_ENV, DistributedError, active, init_from_env, is_main, launched,
                            rank, shard, timeout_seconds, world_size)
from .replica import CommStats, SingleProcess
from .ddp import DataParallel, frozen_names, replicas, sum_hook, trainable_bytes
