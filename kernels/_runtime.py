"""Where a kernel runs: compiled for the CUDA device, or by the Triton interpreter on the CPU.

Triton decides between compiling and interpreting when `@triton.jit` runs, i.e. when a kernel
module is imported (it reads TRITON_INTERPRET then). So that CPU tensors always work, whatever
was imported first, minilora.kernels keeps a second copy of its kernel modules, imported
with the interpreter switched on, under the private package name below. CUDA tensors use the
normal modules (compiled, unless TRITON_INTERPRET=1 was set before the import).

One rule follows for the kernel files: call only Triton builtins (tl.load, tl.dot, tl.join,
tl.reshape, tl.full, tl.reduce, ...), not the @jit library functions (tl.sum, tl.zeros,
tl.interleave, tl.cdiv): those were decorated when Triton was imported, in that import's
mode, and a compiled one cannot be called from interpreted code.
"""
import contextlib
import importlib
import os
import sys
import types
from pathlib import Path

import torch

_PACKAGE = __name__.rsplit(".", 1)[0]            # "minilora.kernels"
_INTERPRETED = _PACKAGE + "._interpreted"


def is_interpreted(kernel) -> bool:
    """True if `kernel` runs under the Triton interpreter (an InterpretedFunction)."""
    return type(kernel).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def _interpreter_on():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _interpreted_module(name: str):
    if _INTERPRETED not in sys.modules:
        pkg = types.ModuleType(_INTERPRETED, "minilora.kernels, imported for the Triton interpreter")
        pkg.__path__ = [str(Path(__file__).parent)]   # same files, second set of module objects
        pkg.__package__ = _INTERPRETED
        sys.modules[_INTERPRETED] = pkg
    with _interpreter_on():
        return importlib.import_module(f"{_INTERPRETED}.{name}")


_interpreter_ok = None


def interpreter_works() -> bool:
    """Can this installation's Triton interpreter run minilora's kernels on CPU tensors?"""
    global _interpreter_ok
    if _interpreter_ok is None:
        try:
            out = torch.zeros(1, dtype=torch.int32)
            _interpreted_module("_probe").loop_probe[(1,)](out, 8, 2)
            _interpreter_ok = int(out.item()) == 4
        except Exception:
            _interpreter_ok = False
    return _interpreter_ok


def kernel(module: str, name: str, device: torch.device):
    """The kernel `name` from kernels/<module>.py, in the form that can run on `device`."""
    if device.type == "cuda":
        return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), name)
    if device.type != "cpu":
        raise ValueError(f"minilora.kernels run on CUDA (compiled) or CPU (Triton interpreter) "
                         f"tensors, got device {device}")
    if not interpreter_works():
        import numpy
        import triton
        raise RuntimeError(f"the Triton interpreter of this installation (triton {triton.__version__}, "
                           f"numpy {numpy.__version__}) cannot run loops with run-time bounds, so "
                           "minilora.kernels cannot run on CPU tensors here; use CUDA tensors, or "
                           "triton >= 3.9")
    fn = getattr(_interpreted_module(module), name)
    if not is_interpreted(fn):
        raise RuntimeError("could not switch the Triton interpreter on for CPU tensors "
                           "(was triton.knobs.runtime.interpret set to False?)")
    return fn


def capability(device: torch.device) -> int:
    """Compute capability as one number (80: A100, 90: H100); 0 for the interpreter."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 0


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a fixed small number for the interpreter)."""
    from .configs import INTERPRETER_SMS
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS
