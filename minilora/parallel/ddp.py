"""Data-parallel fine-tuning on torch.distributed: N processes, one model each, one global batch between them.

    torchrun --nproc_per_node N -m minilora finetune ...        (gloo on CPUs, NCCL on GPUs)

Every rank holds the whole model and reads its shard of each global batch: step s draws the global batch
exactly as one process draws it, and micro-batch i, idx[i·B : (i+1)·B], is split as idx[...][rank::N]. The
loss one process minimises is the token-weighted mean over the global batch,

    L = (1 / T) · Σ_examples Σ_target-tokens ℓ,       T = target tokens of the global batch,

so each rank backpropagates (1/T) · Σ_(its tokens) ℓ and the ranks' gradients are *summed*: Σ_r ∇L_r = ∇L.
T is all-reduced before the forward passes, the step's loss and token count after them (three float64).
With gradient accumulation gradients are summed once per step, after the last micro-batch (DDP's no_sync
before). Shards may be unequal (5 examples on 2 ranks: 3 + 2), but each needs one: batch_size >= N.

Only what trains is communicated: DistributedDataParallel registers the parameters with requires_grad, so
for LoRA and QLoRA the all-reduce (sum_hook, which counts its bytes) carries lora_A and lora_B only. The
frozen base (fp32 weights, or NF4 codes and constants kept as buffers) is kept out of DDP's broadcasts;
instead the ranks check, with one 32-byte all-gather, that their frozen bases have rank 0's sha256.
(minilora.parallel.fsdp, the other replicas, shards the base itself across the ranks.)

Rank 0 alone writes checkpoints, the adapter and metrics, and shows the progress bar; every rank resumes
from the same checkpoint. A rank that dies makes the others fail instead of waiting forever: torchrun
(--max-restarts 0, its default) stops the remaining ranks, and a collective that gets no answer raises
after the process group's timeout (MINILORA_DIST_TIMEOUT seconds, default 300). Simplifications: every rank
evaluates the whole validation set; tokens/s counts every rank's tokens; with dropout > 0 the ranks draw
their masks from the same seed (no longer the single-process run), and a resumed run gives every rank rank
0's random state.
"""
import contextlib
import inspect

import torch
import torch.distributed as dist
import torch.nn as nn

from ..runs.rundir import fingerprint
from .process_group import DistributedError, lost_message, rank, shard, world_size
from .replica import CommStats, SingleProcess

def sum_hook(stats: CommStats, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce the bucket's flat gradient with SUM (Σ_r ∇L_r, see the module
    docstring: the loss is already divided by the global token count, so no division by N) and count its bytes."""
    buf = bucket.buffer()
    stats.grad_bytes += buf.numel() * buf.element_size()
    stats.grad_buckets += 1
    work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True)

    def reduced(fut: torch.futures.Future) -> torch.Tensor:
        try:
            return fut.value()[0]
        except Exception as e:  # a rank died or hangs: say so plainly (DDP re-raises this from backward)
            raise DistributedError(lost_message("the gradient all-reduce", e)) from None

    return work.get_future().then(reduced)


def frozen_names(model: nn.Module) -> list[str]:
    """Names of every parameter without requires_grad and of every buffer: what DDP must leave alone."""
    return [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the gradients of the trainable parameters: what one step all-reduces."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

def replicas(model: nn.Module) -> SingleProcess:
    """The trainer's replicas: DataParallel under a process group of several ranks, else SingleProcess."""
    return DataParallel(model) if world_size() > 1 else SingleProcess(model)


class DataParallel(SingleProcess):
    """SingleProcess's interface over torch.distributed (without a process group it is SingleProcess).

    model is DistributedDataParallel over the trainable parameters, with sum_hook counting into stats;
    find_unused_parameters stays False (every adapter gets a gradient every step). minilora's checkpoint
    segments hand the parameters' gradients back through ordinary autograd: DDP's hooks fire once each."""

    def __init__(self, model: nn.Module, find_unused_parameters: bool = False, bucket_cap_mb: float = 25.0,
                 check_frozen: bool = True):
        super().__init__(model)
        self.rank, self.world_size = rank(), world_size()
        if self.world_size == 1:
            return
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters to train in parallel")
        self.device = next(p for p in model.parameters() if p.requires_grad).device
        if check_frozen:
            self.check_same_frozen()
        from torch.nn.parallel import DistributedDataParallel as DDP
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen_names(model))
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        # buffers (NF4 codes, quantization constants) are on the ignore list: never broadcast, at start or per step
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        self.model = DDP(model, device_ids=ids, bucket_cap_mb=bucket_cap_mb,
                         find_unused_parameters=find_unused_parameters, **no_buffer_sync)
        self.model.register_comm_hook(self.stats, sum_hook)

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's part of a micro-batch (see shard)."""
        return list(indices) if self.world_size == 1 else shard(indices, self.rank, self.world_size)

    def total(self, *values: float) -> float | tuple[float, ...]:
        """Σ over ranks of each value, in one float64 all-reduce (ints stay exact below 2**53)."""
        if self.world_size == 1:
            return super().total(*values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        self.stats.scalar_bytes += t.numel() * t.element_size()
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        except RuntimeError as e:
            raise DistributedError(lost_message("the all-reduce of the step's token count and loss", e)) from None
        out = tuple(t.tolist())
        return out[0] if len(out) == 1 else out

    def sync(self, now: bool):
        """All-reduce the gradients at the end of this backward only when now is True (the last micro-batch
        of a step); before that they accumulate locally (DDP no_sync)."""
        if self.world_size == 1 or now:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            try:
                dist.barrier()
            except RuntimeError as e:
                raise DistributedError(lost_message("the final barrier", e)) from None

    def check_same_frozen(self) -> None:
        """Raise ValueError unless every rank's frozen weights have rank 0's sha256 (a 32-byte all-gather)."""
        digest = torch.tensor(list(bytes.fromhex(fingerprint(self.module))), dtype=torch.uint8,
                              device=self._comm_device())
        gathered = [torch.empty_like(digest) for _ in range(self.world_size)]
        dist.all_gather(gathered, digest)
        differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if differ:
            raise ValueError(f"the frozen base weights on rank(s) {differ} differ from rank 0's: every rank "
                             f"must load the same base model (same file, same seed)")

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")
