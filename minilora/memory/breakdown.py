"""MemoryBreakdown: the bytes of one training step, by what holds them.

The same dataclass comes out of the analytic model (minilora.memory.estimate) and out of a real training
step (minilora.memory.measure), so the two can be printed side by side and compared field by field.
Sizes are bytes; GB means 10⁹ bytes, as in "10B parameters × 12 bytes = 120 GB".
"""
from __future__ import annotations

from dataclasses import dataclass, field

GB = 10**9

# (field, label) in the order tables and stacked bars show them, bottom to top.
PARTS = (
    ("weights", "weights"),
    ("quantized_weights", "NF4 weights (+ constants)"),
    ("master_weights", "fp32 master weights"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("adapters", "LoRA adapters"),
    ("adapter_gradients", "adapter gradients"),
    ("adapter_optimizer_state", "adapter optimizer state"),
    ("gathered", "gathered block (FSDP)"),
    ("activations", "activations"),
)


@dataclass
class MemoryBreakdown:
    """Training memory on the compute device, split by what holds it (all sizes in bytes; under FSDP, of one
    process).

    weights                  base-model tensors kept as they are (frozen or trained), any dtype
    quantized_weights        NF4 codes + double-quantized block constants of the quantized layers
    master_weights           fp32 copies of 16-bit trainable weights (mixed-precision training)
    gradients                gradients of the trainable base weights (full fine-tuning)
    optimizer_state          AdamW's exp_avg and exp_avg_sq (+ its step counters) for the base weights
    adapters, adapter_gradients, adapter_optimizer_state: the same three for LoRA's A and B
    gathered                 FSDP: the all-gathered root unit + the largest block (0 without FSDP)
    activations              peak bytes autograd keeps for backward (tensors saved by the forward)
    offloaded                bytes held in host memory, not in total: paged AdamW's evicted pages, or under
                             FSDP with CPU offload the sharded parameters, gradients and optimizer state

    total = every field above except offloaded. weights_by_dtype splits weights + quantized_weights +
    adapters by storage type ("float32", "bfloat16", "nf4", ...). peak_allocated is
    torch.cuda.max_memory_allocated() of a measured step on CUDA (None elsewhere and for estimates).
    n_params counts the base model (adapters not included), n_trainable what the optimizer updates.
    saved: for estimates, the SavedActivations walk behind `activations` (which tensor, how many bytes).
    """
    weights: int = 0
    quantized_weights: int = 0
    master_weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    adapters: int = 0
    adapter_gradients: int = 0
    adapter_optimizer_state: int = 0
    gathered: int = 0
    activations: int = 0
    offloaded: int = 0
    weights_by_dtype: dict[str, int] = field(default_factory=dict)
    n_params: int = 0
    n_trainable: int = 0
    tokens: int = 0
    peak_allocated: int | None = None
    label: str = ""
    saved: object = field(default=None, repr=False, compare=False)  # estimate(): the SavedActivations walk

    @property
    def total(self) -> int:
        """Bytes on the compute device: Σ of all parts except offloaded."""
        return sum(getattr(self, f) for f, _ in PARTS)

    @property
    def state_bytes(self) -> int:
        """Everything except activations: what the model and optimizer hold regardless of batch size."""
        return self.total - self.activations

    def bytes_per_param(self, part: str | None = None) -> float:
        """Bytes of `part` (or of the total) per model parameter, e.g. 12.0 for the lecture's full fine-tuning."""
        if not self.n_params:
            raise ValueError("bytes_per_param: n_params is 0")
        return (self.total if part is None else getattr(self, part)) / self.n_params

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) for every non-empty part, in PARTS order."""
        return [(label, getattr(self, f)) for f, label in PARTS if getattr(self, f)]

    def as_dict(self) -> dict[str, int]:
        """Field name -> bytes for the PARTS plus total and offloaded."""
        d = {f: getattr(self, f) for f, _ in PARTS}
        d["offloaded"], d["total"] = self.offloaded, self.total
        return d

    def relative_error(self, other: "MemoryBreakdown", part: str | None = None) -> float:
        """|self − other| / other for one part (or the total): how far an estimate is from a measurement."""
        a = self.total if part is None else getattr(self, part)
        b = other.total if part is None else getattr(other, part)
        if b == 0:
            return 0.0 if a == 0 else float("inf")
        return abs(a - b) / b

    def __str__(self) -> str:
        return format_table([self])


def format_bytes(n: float, unit: str = "auto") -> str:
    """Decimal units as on the slides: 120e9 -> '120.0 GB', 2.5e6 -> '2.50 MB'."""
    if unit == "GB" or (unit == "auto" and abs(n) >= 1e9):
        return f"{n / 1e9:.1f} GB"
    if unit == "MB" or (unit == "auto" and abs(n) >= 1e6):
        return f"{n / 1e6:.2f} MB"
    if unit == "kB" or (unit == "auto" and abs(n) >= 1e3):
        return f"{n / 1e3:.2f} kB"
    return f"{int(n)} B"


def format_table(breakdowns: list[MemoryBreakdown], unit: str = "auto") -> str:
    """One column per breakdown (headed by its label), one row per part that any of them has."""
    if not breakdowns:
        raise ValueError("format_table needs at least one MemoryBreakdown")
    names = [f for f, _ in PARTS if any(getattr(b, f) for b in breakdowns)]
    labels = dict(PARTS)
    rows = [(labels[f], [getattr(b, f) for b in breakdowns]) for f in names]
    rows.append(("total (device)", [b.total for b in breakdowns]))
    if any(b.offloaded for b in breakdowns):
        rows.append(("offloaded (host)", [b.offloaded for b in breakdowns]))
    if any(b.peak_allocated is not None for b in breakdowns):
        rows.append(("cuda max allocated", [b.peak_allocated or 0 for b in breakdowns]))
    w0 = max(len(r[0]) for r in rows)
    cells = [[format_bytes(v, unit) for v in vals] for _, vals in rows]
    w = max([len(b.label) for b in breakdowns] + [len(c) for row in cells for c in row]) + 2
    out = [" " * w0 + "".join(f"{b.label:>{w}}" for b in breakdowns)]
    for (name, _), row in zip(rows, cells):
        out.append(f"{name:<{w0}}" + "".join(f"{c:>{w}}" for c in row))
    return "\n".join(out)
