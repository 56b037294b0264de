"""The kernels' entry points for a QuantState-like object (machinery): unpack its fields, call ops.py."""
from typing import Optional

import torch

from minilora.quant.format import NESTED_BLOCKSIZE

from .ops import nf4_dequantize, nf4_matmul, nf4_matmul_dx

def _state_args(state) -> dict:
    """Raw tensors of an NF4 QuantState-like object (duck-typed: only the field names matter)."""
    missing = [f for f in ("packed", "absmax", "code", "blocksize", "shape") if not hasattr(state, f)]
    if missing:
        raise TypeError(f"state must have the NF4 QuantState fields; {type(state).__name__} "
                        f"lacks {', '.join(missing)}")
    if getattr(state, "bits", 4) != 4:
        raise ValueError(f"the kernels read NF4 (4-bit) states; a {state.bits}-bit state dequantizes in PyTorch "
                         f"(minilora.quant.dequantize_nf2)")
    nested_blocksize = getattr(state, "nested_blocksize", NESTED_BLOCKSIZE)
    if nested_blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"the kernels expect nested_blocksize {NESTED_BLOCKSIZE}, state has "
                         f"{nested_blocksize}")
    return dict(packed=state.packed, absmax=state.absmax, code=state.code,
                blocksize=int(state.blocksize),
                nested_absmax=getattr(state, "nested_absmax", None),
                nested_code=getattr(state, "nested_code", None),
                offset=getattr(state, "offset", None))


def _state_nk(state) -> tuple:
    shape = tuple(state.shape)
    if len(shape) != 2:
        raise ValueError(f"state.shape must be (N, K) for a matmul, got {shape}")
    return shape


def nf4_dequantize_state(state, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """nf4_dequantize for a QuantState-like object; dtype defaults to state.dtype (or fp32)."""
    dtype = dtype or getattr(state, "dtype", None) or torch.float32
    return nf4_dequantize(**_state_args(state), shape=tuple(state.shape), dtype=dtype)


def nf4_matmul_state(x: torch.Tensor, state, **epilogue) -> torch.Tensor:
    """nf4_matmul for a QuantState-like object; epilogue: bias, lora_xa, lora_B, lora_scaling, kernel."""
    args = _state_args(state)
    N, K = _state_nk(state)
    return nf4_matmul(x, **args, N=N, K=K, **epilogue)


def nf4_matmul_dx_state(dy: torch.Tensor, state, kernel: str = "auto") -> torch.Tensor:
    """nf4_matmul_dx for a QuantState-like object."""
    args = _state_args(state)
    N, K = _state_nk(state)
    return nf4_matmul_dx(dy, **args, N=N, K=K, kernel=kernel)
