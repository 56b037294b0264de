"""The measured side: bytes of the tensors a real training step holds, in the same MemoryBreakdown.

Parameters, buffers, gradients and optimizer state are counted from the tensors themselves (each storage
once). Activations are the peak bytes autograd keeps for backward during the step, read by
minilora.memory.saved's SavedTensorMeter (so it works on the CPU too, checkpointed recomputation
included). On CUDA, torch.cuda.max_memory_allocated() of the step is reported beside them: it also sees
what the meter does not (temporaries, the logits, allocator rounding).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..inject import ADAPTER_TENSORS
from ..nf4_linear import NF4Linear
from ..params import count_parameters
from .breakdown import MemoryBreakdown
from .estimate import dtype_name
from .saved import SavedTensorMeter

ADAPTER_NAMES = ADAPTER_TENSORS  # lora_A, lora_B and DoRA's lora_magnitude_vector: what an adapter trains


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of t this process holds: a sharded tensor's (FSDP's DTensor) local shard, else t."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _param_bytes(params: list[torch.Tensor]) -> tuple[int, int]:
    """(bytes of the parameters, bytes of their gradients)."""
    return sum(_nbytes(p) for p in params), sum(_nbytes(p.grad) for p in params if p.grad is not None)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """model(idx, targets) -> (logits, loss) for batch = (idx, targets): minilora's GPT."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError("batch must be (idx, targets) for the default loss; pass loss_fn for anything else")
    _, loss = model(*batch)
    return loss


def _optimizer_bytes(optimizer: torch.optim.Optimizer, adapter_ids: set[int]) -> tuple[int, int, int]:
    """(base state on device, adapter state on device, host-resident paged state)."""
    base = adapter = 0
    seen: set[int] = set()
    for p, st in optimizer.state.items():
        b = 0
        for v in st.values():
            if isinstance(v, torch.Tensor) and _local(v).data_ptr() not in seen:
                seen.add(_local(v).data_ptr())
                b += _nbytes(v)
        if id(p) in adapter_ids:
            adapter += b
        else:
            base += b
    pager = getattr(optimizer, "pager", None)
    if pager is None:
        return base, adapter, 0
    # PagedAdamW: the pages on the device now, shared out by element count; host copies are offloaded
    params = [p for g in optimizer.param_groups for p in g["params"] if p in optimizer.state]
    n_adapter = sum(p.numel() for p in params if id(p) in adapter_ids)
    n_all = sum(p.numel() for p in params) or 1
    resident = pager.resident_bytes
    adapter += resident * n_adapter // n_all
    base += resident - resident * n_adapter // n_all
    return base, adapter, pager.host_bytes


def measure(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any,
            loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, steps: int = 1,
            label: str = "measured") -> MemoryBreakdown:
    """Run `steps` training steps (zero_grad, forward, backward, optimizer.step) and count the bytes held.

    This trains the model: call it on a copy, or as the first step(s) of a run. activations is the largest
    saved-for-backward peak of the steps; the other parts are counted after the last step (gradients are
    still there). loss_fn(model, batch) -> scalar loss; the default expects batch = (idx, targets) for
    minilora's GPT. Returns a MemoryBreakdown with the same fields estimate() fills.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    loss_fn = loss_fn or default_loss
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak_saved = 0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        meter = SavedTensorMeter(exclude=model)
        with meter:
            loss = loss_fn(model, batch)
            loss.backward()
            del loss
        peak_saved = max(peak_saved, meter.peak)
        optimizer.step()

    out = MemoryBreakdown(label=label, activations=peak_saved)
    if cuda:
        torch.cuda.synchronize()
        out.peak_allocated = torch.cuda.max_memory_allocated()
    named = list(model.named_parameters())
    adapters = [p for name, p in named if name.endswith(ADAPTER_NAMES)]
    out.adapters, out.adapter_gradients = _param_bytes(adapters)
    by_dtype: Counter[str] = Counter()
    seen: set[int] = set()
    for module in model.modules():  # a quantized layer's codes and constants: buffers, or under FSDP parameters
        if not isinstance(module, NF4Linear):
            continue  # plain buffers are counted below
        own = [t for n, t in module.named_parameters(recurse=False) if n != "bias"] + list(module.buffers(recurse=False))
        b = sum(_nbytes(t) for t in own if _local(t).data_ptr() not in seen)
        seen.update(_local(t).data_ptr() for t in own)
        out.quantized_weights += b
        by_dtype["nf4"] += b
    quantized = set(seen)
    named = [(name, p) for name, p in named if _local(p).data_ptr() not in quantized]
    for _, p in named:
        seen.add(_local(p).data_ptr())
        by_dtype[dtype_name(p.dtype)] += _nbytes(p)
    out.weights, out.gradients = _param_bytes([p for name, p in named if not name.endswith(ADAPTER_NAMES)])
    for t in model.buffers():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.weights += _nbytes(t)
            by_dtype[dtype_name(t.dtype)] += _nbytes(t)
    out.weights_by_dtype = dict(by_dtype)
    adapter_ids = {id(p) for p in adapters}
    out.optimizer_state, out.adapter_optimizer_state, out.offloaded = _optimizer_bytes(optimizer, adapter_ids)
    count = count_parameters(model)
    out.n_params, out.n_trainable = count.total - sum(p.numel() for p in adapters), count.trainable
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    out.tokens = first.numel() if isinstance(first, torch.Tensor) else 0
    return out
