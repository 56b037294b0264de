"""Fully sharded data parallel: the frozen 4-bit base itself split across the processes.

    torchrun --nproc_per_node N -m minilora finetune --fsdp ...        (DDP stays the default)

DataParallel (minilora.parallel) gives every rank a whole model: N processes train faster, not bigger.
Here every tensor of the model is cut on dim 0 into N shards (torch.chunk: ⌈rows/N⌉ rows each, the last
shorter or empty) and rank r keeps shard r. A transformer block is all-gathered into whole tensors just
before it runs, in forward and again in backward (for dX = dY·W, and for the replay of gradient
checkpointing), and freed after it; the root unit (embeddings, final LayerNorm, lm_head) stays gathered from
its forward to its backward. So one rank holds

    Σ_tensors bytes / N  +  the root and one gathered block  +  the activations of its 1/N of the batch.

QLoRA: the base is NF4. Its packed 4-bit codes and the double-quantization constants (absmax codes, nested
absmax) are turned into frozen parameters (frozen_as_parameters), so they are sharded and gathered like any
weight: the bytes that cross the wire are the 0.52 bytes per weight of the 4-bit format, and the dequantized
weight exists only inside the matmul, as in one process. The adapters are ordinary sharded parameters. Their
gradients are reduce-scattered (rank r receives Σ_ranks of its shard) and *summed*, not averaged: the loss of
each rank is already divided by the global batch's token count (see minilora.parallel). AdamW updates
each shard with its shard of the state, element by element, so the numbers are those of one process.

Built on PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard, one unit per block plus the root; gloo on
CPUs, NCCL on GPUs). With gradient checkpointing every block is its own segment (not ⌈√n⌉ segments of
several blocks: replaying a segment gathers its first block while backward holds its last, two blocks at
once), replayed by torch.utils.checkpoint: FSDP finds a block's gradients in .grad after backward, and
minilora's own segment Function hands them back as return values instead. Backward does not prefetch the
next block either: one block gathered at a time, memory before overlap.

Checkpoints are those of one process: every rank gathers the trainable weights (gathered()) and the AdamW
state (optimizer_state()) into whole tensors and rank 0 writes them; a resumed rank reads the whole tensors
and keeps its own shard (load_optimizer_state, local). So a run resumes on another number of processes,
with or without FSDP.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from .ddp import DataParallel
from .process_group import rank, world_size
from .replica import SingleProcess
from ..nf4_linear import NF4Linear

SHARDED_NF4 = ("packed", "absmax", "nested_absmax")  # the per-layer NF4 tensors FSDP shards (offset is 0-dim)


def frozen_as_parameters(model: nn.Module) -> list[str]:
    """Turn every NF4Linear's packed codes and quantization constants from buffers into frozen parameters (the
    same tensors, the same names), so that FSDP shards them. Returns their names."""
    names = []
    for prefix, layer in model.named_modules():
        if not isinstance(layer, NF4Linear):
            continue
        for name in SHARDED_NF4:
            t = layer._buffers.get(name)
            if t is not None and t.dim() >= 1:
                del layer._buffers[name]
                layer.register_parameter(name, nn.Parameter(t, requires_grad=False))
                names.append(f"{prefix}.{name}")
    return names


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks (model.transformer.h): one FSDP unit each."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"fsdp shards a minilora GPT block by block; {type(model).__name__} has no transformer.h")
    return blocks


def _run_blocks_replayed(model: nn.Module):
    """GPT.run_blocks with every block its own checkpoint segment, replayed by torch.utils.checkpoint."""
    def run_blocks(x: torch.Tensor) -> torch.Tensor:
        replay = model.config.gradient_checkpointing and model.training and torch.is_grad_enabled()
        for block in model.transformer.h:
            x = checkpoint(block, x, use_reentrant=False) if replay else block(x)
        return x
    return run_blocks


class FullyShardedDataParallel(DataParallel):
    """SingleProcess's interface with the model sharded across the ranks (without a process group: SingleProcess).

    The data are split as in DataParallel (shard, total, barrier are its); sync(now) turns the
    reduce-scatter of gradient accumulation's earlier micro-batches off. Every rank must check the same
    frozen base: it is compared (sha256) before it is cut."""

    def __init__(self, model: nn.Module, check_frozen: bool = True):
        SingleProcess.__init__(self, model)
        self.rank, self.world_size = rank(), world_size()
        if self.world_size == 1:
            return
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters to train in parallel")
        blocks, self.sharded = blocks_of(model), True
        self.device = next(p for p in model.parameters() if p.requires_grad).device
        if check_frozen:
            self.check_same_frozen()
        frozen_as_parameters(model)
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.run_blocks = _run_blocks_replayed(model)  # an instance attribute: GPT.run_blocks stays as it is
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in self.units:
            unit.set_modules_to_backward_prefetch([])  # one block gathered at a time (module docstring)
            unit.set_gradient_divide_factor(1.0)  # Σ_r ∇L_r, see the module docstring, as a plain SUM
            unit.set_force_sum_reduction_for_comms(True)  # (gloo has no pre-multiplied sum)

    def sync(self, now: bool):
        """Reduce-scatter the gradients at the end of this backward only when now is True (the last
        micro-batch of a step); before that each rank accumulates whole gradients of its own part."""
        if self.sharded:
            self.model.set_requires_gradient_sync(now)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self):
        """Every unit all-gathered: the module attributes hold whole tensors inside the with-block (read them;
        what persists are the shards). A collective: every rank must enter it."""
        if not self.sharded:
            yield
            return
        for unit in self.units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in self.units:
                unit.reshard()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() with every sharded tensor gathered whole (a collective: every rank calls it)."""
        sd = optimizer.state_dict()
        whole = lambda v: v.full_tensor() if isinstance(v, DTensor) else v  # noqa: E731
        return {**sd, "state": {i: {k: whole(v) for k, v in s.items()} for i, s in sd["state"].items()}}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """optimizer.load_state_dict of a whole state (optimizer_state's, or one process's), each tensor shaped
        like its parameter cut to this rank's shard."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.sharded:
            state = {**state, "state": {i: {k: self.local(v, params[i]) for k, v in s.items()}
                                        for i, s in state["state"].items()}}
        optimizer.load_state_dict(state)

    def local(self, whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's shard of `whole` where `like` is a sharded parameter of the same shape; else whole."""
        if not (isinstance(like, DTensor) and isinstance(whole, torch.Tensor) and whole.shape == like.shape):
            return whole
        return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)

    def measure(self, optimizer: torch.optim.Optimizer, batch, label: str = "measured"):
        """minilora.memory.measure of one training step of this rank on its batch, with `gathered` measured as
        well: the bytes of the root unit and of the largest block while each is gathered, sampled as it starts
        its forward (the root's blocks are still sharded then). Without FSDP's padding: the bytes the layers use."""
        from ..memory import measure
        if not self.sharded:
            return measure(self.module, optimizer, batch, label=label)
        units, sizes = [self.module, *blocks_of(self.module)], {}

        def sample(unit: nn.Module, args) -> None:
            held = sum(p.numel() * p.element_size() for p in unit.parameters() if not isinstance(p, DTensor))
            sizes[id(unit)] = max(sizes.get(id(unit), 0), held)
        hooks = [u.register_forward_pre_hook(sample) for u in units]  # after FSDP's own: it gathers first
        try:
            out = measure(self.module, optimizer, batch, label=label)
        finally:
            for h in hooks:
                h.remove()
        out.gathered = sizes.get(id(units[0]), 0) + max(sizes.get(id(b), 0) for b in units[1:])
        return out

    def report(self) -> dict:
        return {**super().report(), "fsdp": self.sharded}
