"""QuantState: everything a blockwise 4-bit (or 2-bit) tensor is stored as, the checks a state must pass, and equality.

    w_j   = code[q_j] · absmax'_{j // blocksize}       q_j: a nibble (bits=4) or a 2-bit field (bits=2, nf2.py)
    absmax' = absmax                                                          (double_quant=False, fp32)
    absmax'_i = nested_code[absmax_i] · nested_absmax[i // 256] + offset      (double_quant=True, uint8)

Size: 4 bits per weight + 32/blocksize bits for an fp32 absmax, or with double quantization
8/blocksize + 32/(blocksize·256) bits; for blocksize 64 that is 4.5 and 4.127 bits per parameter (2.127 at 2 bits).

A state built or changed by hand is checked before it is dequantized (check_state): every field's type,
dtype and size must agree with the shape and the block sizes, so that a wrong field is a clear error and
never a wrong tensor. The checks read no tensor values (no device synchronisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .codebooks import check_code_once
from .format import FLOAT_DTYPES, NESTED_BLOCKSIZE, check_blocksize, kbit_nbytes


@dataclass(eq=False)
class QuantState:
    """A blockwise 4-bit tensor (bits=2: NF2). Field names are a contract shared with the kernels (which read
    4-bit states only); see the module docstring."""
    packed: torch.Tensor                      # uint8 ((numel + 1) // 2,), first element in the high nibble
                                              # (bits=2: ((numel + 3) // 4,), first element in the top 2 bits)
    absmax: torch.Tensor                      # fp32 (blocks,), or uint8 codes into nested_code when double_quant
    code: torch.Tensor                        # fp32 (2^bits,): the codebook (NF4 for quantize_nf4, NF2)
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype                        # dtype of the original tensor; dequantize returns it
    double_quant: bool = False
    offset: torch.Tensor | None = None        # fp32 0-dim: mean of the block absmax values (double_quant)
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(blocks / 256),) (double_quant)
    nested_code: torch.Tensor | None = None   # fp32 (256,): signed dynamic 8-bit map (double_quant)
    nested_blocksize: int = NESTED_BLOCKSIZE
    bits: int = 4                             # bits per code: 4, or 2 (quantize_nf2)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact bytes of per-tensor data: packed codes + absmax (+ offset + nested absmax).

        The codebooks (code: 64 bytes, nested_code: 1 KiB) are shared constants and not counted.
        An empty tensor stores nothing: 0 bytes.
        """
        return kbit_nbytes(self.numel, self.bits, self.blocksize, self.double_quant, self.nested_blocksize)

    @property
    def bits_per_param(self) -> float:
        """8 · nbytes / numel (0.0 for an empty tensor)."""
        return 8 * self.nbytes / self.numel if self.numel else 0.0

    def __eq__(self, other: object) -> bool:
        """Same field values: tensors equal in dtype, shape and every element (torch.equal), the rest by ==."""
        if not isinstance(other, QuantState):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                        and a.shape == b.shape and torch.equal(a, b.to(a.device))):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # mutable, like any dataclass with an equality


def _tensor(state: QuantState, name: str, dtypes: tuple[torch.dtype, ...], numel: int,
            device: torch.device) -> None:
    t = getattr(state, name)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"QuantState.{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"QuantState.{name} must be {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                        f"got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"QuantState.{name} must hold {numel} values for shape {tuple(state.shape)}, "
                         f"blocksize {state.blocksize} and nested_blocksize {state.nested_blocksize}, got {t.numel()}")
    if t.device != device:
        raise ValueError(f"QuantState.{name} is on {t.device}, packed on {device}: all tensors must be on one device")


def check_state(state: QuantState) -> QuantState:
    """Every field consistent with the others (see the module docstring); returns state, or raises naming the field."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    shape = state.shape
    if not isinstance(shape, (torch.Size, tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"QuantState.shape must be a tuple of non-negative ints, got {shape!r}")
    if state.dtype not in FLOAT_DTYPES:
        raise TypeError(f"QuantState.dtype must be float32, float16 or bfloat16, got {state.dtype!r}")
    check_blocksize(state.blocksize, "QuantState.blocksize")
    if state.bits not in (4, 2) or isinstance(state.bits, bool):
        raise ValueError(f"QuantState.bits must be 4 or 2, got {state.bits!r}")
    if not isinstance(state.double_quant, bool):
        raise TypeError(f"QuantState.double_quant must be a bool, got {state.double_quant!r}")
    if not isinstance(state.packed, torch.Tensor):
        raise TypeError(f"QuantState.packed must be a torch.Tensor, got {type(state.packed).__name__}")
    n, device = math.prod(shape), state.packed.device
    blocks = math.ceil(n / state.blocksize)
    _tensor(state, "packed", (torch.uint8,), -(-n * state.bits // 8), device)
    if not isinstance(state.code, torch.Tensor) or state.code.device != device:
        raise ValueError(f"QuantState.code must be a tensor on {device} like packed")
    check_code_once(state.code, "QuantState.code", 2 ** state.bits)
    if not state.double_quant:
        if isinstance(state.absmax, torch.Tensor) and state.absmax.dtype == torch.uint8:
            raise ValueError("QuantState.absmax is uint8 (double-quantized codes) but double_quant is False")
        _tensor(state, "absmax", FLOAT_DTYPES, blocks, device)
        return state
    check_blocksize(state.nested_blocksize, "QuantState.nested_blocksize")
    _tensor(state, "absmax", (torch.uint8,), blocks, device)
    _tensor(state, "offset", FLOAT_DTYPES, 1, device)
    _tensor(state, "nested_absmax", FLOAT_DTYPES, math.ceil(blocks / state.nested_blocksize), device)
    _tensor(state, "nested_code", (torch.float32,), 256, device)
    return state
