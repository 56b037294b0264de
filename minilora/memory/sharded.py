"""FSDP's share of the bytes: what one process of N holds when every parameter is sharded on dim 0.

minilora's FSDP (PyTorch's fully_shard on each transformer block, then on the whole GPT) splits every
parameter, trainable or frozen, of any dtype, along its first dimension. Rank 0 holds the largest piece:

    shard(shape)    = ⌈shape[0] / N⌉ · Π shape[1:]        elements held by rank 0
    gathered(shape) = ⌈shape[0] / N⌉ · N · Π shape[1:]    elements after the all-gather (padding included)

A QLoRA layer stores its NF4 weight as three 1-D tensors, each sharded like a parameter: the packed codes
(⌈n/2⌉ uint8), absmax (one per block of 64: uint8 codes under double quantization, else fp32) and
nested_absmax (fp32, one per 256 blocks); its fp32 offset is a buffer, replicated on every process.
Gradients and AdamW state of a trainable tensor are sharded like the tensor (reduce-scatter; exp_avg and
exp_avg_sq per local element; the step counter is replicated). Per process:

    held        Σ shard(p) · itemsize(p) over every parameter, + the replicated offsets
    gathered    the root unit (wte, wpe, ln_f, the tied lm_head: gathered from forward through backward)
                + the largest block (gathered while it runs forward, and again in backward)
    activations those of ⌈B / N⌉ sequences: rank 0's share of a global micro-batch of B

cpu_offload models FSDP2's CPUOffloadPolicy: the sharded parameters, their gradients and the optimizer
state live in host memory (`offloaded`), the device keeps the gathered units and the activations.
minilora's trainer does not run CPU offload; it is an estimate only. Transients are not counted: the
full-size gradients of a block before their reduce-scatter (adapter-sized under LoRA/QLoRA) and the
host-to-device copy of a shard before its all-gather.
"""
from __future__ import annotations

import math
import re

from ..quant.format import NESTED_BLOCKSIZE
from .breakdown import MemoryBreakdown

NF4_OFFSET_BYTES = 4  # double quantization's fp32 offset: a 0-dim buffer, not sharded
_BLOCK = re.compile(r"^(?:transformer\.h|model\.layers)\.(\d+)\.")  # a GPT block or a Llama decoder layer
_SHARDED_PARTS = ("weights", "quantized_weights", "master_weights", "gradients", "optimizer_state", "adapters",
                  "adapter_gradients", "adapter_optimizer_state")


def shard_numel(shape: tuple[int, ...], world: int) -> int:
    """Elements of a tensor of `shape` on rank 0 of `world` processes: ⌈shape[0] / N⌉ · Π shape[1:]."""
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def gathered_numel(shape: tuple[int, ...], world: int) -> int:
    """Elements of the all-gathered tensor: every shard at rank 0's size, ⌈shape[0] / N⌉ · N · Π shape[1:]."""
    return shard_numel(shape, world) * world


def nf4_tensors(n: int, blocksize: int = 64, double_quant: bool = True) -> list[tuple[int, int]]:
    """(numel, bytes per element) of the 1-D tensors holding n weights in NF4: the packed codes, absmax and,
    with double quantization, nested_absmax (the replicated offset is NF4_OFFSET_BYTES on top)."""
    blocks = math.ceil(n / blocksize)
    if not double_quant:
        return [(math.ceil(n / 2), 1), (blocks, 4)]
    return [(math.ceil(n / 2), 1), (blocks, 1), (math.ceil(blocks / NESTED_BLOCKSIZE), 4)]


def check_fsdp(fsdp, cpu_offload, optimizer: str, batch_size: int) -> None:
    """fsdp: a positive int; > 1 needs optimizer 'adamw' and a batch of at least fsdp sequences;
    cpu_offload: a bool, and True only with fsdp > 1 (it offloads FSDP's shards)."""
    if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp <= 0:
        raise ValueError(f"fsdp must be a positive int (the number of processes), got {fsdp!r}")
    if not isinstance(cpu_offload, bool):
        raise ValueError(f"cpu_offload must be True or False, got {cpu_offload!r}")
    if fsdp > 1 and optimizer != "adamw":
        raise ValueError(f"optimizer={optimizer!r} is not available with fsdp={fsdp}: FSDP trains with 'adamw'")
    if fsdp > 1 and batch_size < fsdp:
        raise ValueError(f"batch_size={batch_size} is smaller than fsdp={fsdp}: every process needs a sequence")
    if cpu_offload and fsdp == 1:
        raise ValueError("cpu_offload=True needs fsdp > 1: it moves FSDP's shards to host memory")


class Sharding:
    """Per-process bytes of the parameters on `world` processes, and the gathered bytes of each FSDP unit
    (a block 'transformer.h.<i>' or 'model.layers.<i>', or '' for the root). world=1: no sharding, nothing gathered."""

    def __init__(self, world: int):
        self.world, self.units, self.replicated = world, {}, 0

    def _gather(self, name: str, nbytes: int) -> None:
        unit = m.group(0)[:-1] if (m := _BLOCK.match(name)) else ""
        self.units[unit] = self.units.get(unit, 0) + nbytes

    def param(self, name: str, shape: tuple[int, ...], itemsize: int, times: int = 1) -> int:
        """Bytes of the parameter `name` of `shape` held by rank 0, `times` over: the same parameter of `times`
        blocks alike, of which `name`'s block stands for the others (gathered once, each block on its own)."""
        self._gather(name, gathered_numel(shape, self.world) * itemsize)
        return times * shard_numel(shape, self.world) * itemsize

    def nf4(self, name: str, n: int, blocksize: int, double_quant: bool, times: int = 1) -> int:
        """Bytes of the NF4 storage of n weights of the layer `name` held by rank 0 (offset included), `times`
        over as for param()."""
        tensors = nf4_tensors(n, blocksize, double_quant)
        self._gather(name, sum(gathered_numel((k,), self.world) * size for k, size in tensors))
        offset = NF4_OFFSET_BYTES if double_quant else 0
        self.replicated += times * offset
        return times * (sum(shard_numel((k,), self.world) * size for k, size in tensors) + offset)

    def gathered(self) -> int:
        """The root unit + the largest block, all-gathered: 0 without FSDP (world=1)."""
        if self.world == 1:
            return 0
        return self.units.get("", 0) + max((b for u, b in self.units.items() if u), default=0)


def offload(out: MemoryBreakdown, replicated: int) -> None:
    """CPU offload: the sharded parameters, gradients and optimizer state move to `offloaded` (host memory);
    the replicated buffers (`replicated` bytes of NF4 offsets) stay on the device."""
    for part in _SHARDED_PARTS:
        out.offloaded += getattr(out, part)
        setattr(out, part, 0)
    out.quantized_weights, out.offloaded = replicated, out.offloaded - replicated
