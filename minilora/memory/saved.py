"""What autograd keeps: the bytes of tensors saved for backward, alive at each moment.

Every tensor an operation saves for its backward (a linear layer's input, a dropout mask, a softmax output)
passes through `torch.autograd.graph.saved_tensors_hooks`. The meter's pack hook wraps it in a small
`_Saved` object and adds its storage's bytes to a running total; autograd drops that object when it frees
the saved tensor (after the backward of its node, or when the graph is discarded), and the object's
finaliser subtracts the bytes again. So at any moment

    current = Σ nbytes(storage)  over the distinct storages autograd holds for backward

and `peak` is the largest `current` seen over a forward and backward pass. A storage saved by several
operations (x is saved by a LayerNorm and by the residual add's neighbours) is counted once, with a
reference count. Parameters are not activations: a saved parameter, or a view of one (a linear layer saves
weight.t()), is left out, and so is any storage of the tensors or modules passed as `exclude`.

The meter works on any device, the CPU included, which is how minilora measures gradient checkpointing's
√n law instead of assuming it. Tensors saved while recomputing a checkpointed segment in backward pass
through the same hooks (saved-tensor hooks are thread-local state that autograd carries into backward),
so they are counted too. Not counted: tensors kept alive outside autograd's saved-tensor mechanism (for
instance torch.utils.checkpoint's non-reentrant variant stashes its recomputed tensors behind its own
hooks), and temporaries that are freed without being saved.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class SavedBytes:
    """peak: most saved-activation bytes alive at once; total: bytes saved over the whole run (each storage
    counted once per time it became saved); count: number of save events (pack-hook calls)."""
    peak: int
    total: int
    count: int


class _Saved:
    """The packed form of a saved tensor: the tensor plus the meter entry it holds a reference on."""
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key, meter: "SavedTensorMeter | None"):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):  # autograd released this saved tensor
        if self.meter is not None:
            self.meter._release(self.key)


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        s = t.untyped_storage()
        return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (sparse, nested, ...)
        return ("id", id(t)), t.numel() * t.element_size()


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


class SavedTensorMeter:
    """Context manager that tracks the saved-for-backward bytes alive at each moment.

    with SavedTensorMeter() as m:
        loss = model(x, y)[1]; loss.backward()
    m.peak, m.current, m.total

    on_change(current) is called after every change of `current` (used by the paging demonstration to model
    a device whose free memory shrinks while activations are alive); an exception it raises propagates
    out of the forward or backward pass that caused the change.
    """

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] | None = None,
                 on_change: Callable[[int], None] | None = None):
        self._excluded: set[tuple] = set()
        if exclude is not None:
            tensors = (list(exclude.parameters()) + list(exclude.buffers())
                       if isinstance(exclude, nn.Module) else list(exclude))
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"exclude must be a module or tensors, got an item of type {type(t).__name__}")
                self._excluded.add(_storage_key(t)[0])
        self.on_change = on_change
        self._live: dict[tuple, list[int]] = {}  # key -> [nbytes, references]
        self._lock = threading.Lock()
        self.current = self.peak = self.total = self.count = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if _is_parameter(t):
            return _Saved(t, None, None)
        key, nbytes = _storage_key(t)
        if key in self._excluded:
            return _Saved(t, None, None)
        with self._lock:
            self.count += 1
            entry = self._live.get(key)
            if entry is not None:
                entry[1] += 1
                return _Saved(t, key, self)
            self._live[key] = [nbytes, 1]
            self.current += nbytes
            self.total += nbytes
            self.peak = max(self.peak, self.current)
            current = self.current
        if self.on_change is not None:
            self.on_change(current)
        return _Saved(t, key, self)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key) -> None:
        with self._lock:
            entry = self._live[key]
            entry[1] -= 1
            if entry[1]:
                return
            del self._live[key]
            self.current -= entry[0]
            current = self.current
        if self.on_change is not None:
            try:
                self.on_change(current)
            except Exception:  # a finaliser must not raise; bytes going down never make a device overflow
                pass

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.current

    def result(self) -> SavedBytes:
        return SavedBytes(peak=self.peak, total=self.total, count=self.count)

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def measure_saved_activations(fn: Callable[[], Any],
                              exclude: nn.Module | Iterable[torch.Tensor] | None = None) -> SavedBytes:
    """Run fn() (a forward and backward pass) and return the peak and total bytes autograd saved for backward.

    peak = max over time of Σ nbytes(storage) of the distinct non-parameter tensors saved and not yet freed.
    Pass the model as `exclude` to leave out its buffers too (quantized weights, for instance); parameters
    and views of parameters are always left out. fn's return value is dropped before the meter closes, so a
    graph that fn returns (without calling backward) is freed and does not stay counted.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (a forward and backward pass), got {type(fn).__name__}")
    meter = SavedTensorMeter(exclude)
    with meter:
        out = fn()
        del out
    return meter.result()
