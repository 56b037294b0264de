"""Python entry points of minilora.kernels: check the inputs, pick a plan, launch.

The functions take the raw tensors of an NF4 weight (see nf4_tile.py for the layout);
state_ops.py has the same for any object with those fields (a minilora.quant QuantState).
"""
from dataclasses import dataclass
from typing import Optional, Union

import torch

from minilora.quant.format import FLOAT_DTYPES, NESTED_BLOCKSIZE, is_blocksize

from . import _runtime
from .configs import (cdiv, decode_supported, plan_dequant, plan_gemv, plan_gemv_dx, plan_matmul,
                      plan_matmul_dx)

KERNELS = ("auto", "decode", "tiles")   # nf4_matmul(..., kernel=): auto = decode when it applies


@dataclass
class _NF4:
    """Validated, flat, contiguous tensors of one NF4 weight W (N, K)."""
    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_code: torch.Tensor
    nested_absmax: torch.Tensor
    offset: torch.Tensor
    blocksize: int
    double_quant: bool
    numel: int

    def pointers(self) -> tuple:
        return (self.packed, self.absmax, self.code, self.nested_code, self.nested_absmax, self.offset)


def _check_nf4(packed, absmax, code, numel: int, blocksize: int, nested_absmax, nested_code,
               offset, device: Optional[torch.device] = None) -> _NF4:
    for name, t in (("packed", packed), ("absmax", absmax), ("code", code)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device = packed.device if device is None else device
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (two 4-bit codes per byte), got {packed.dtype}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, expected (numel + 1) // 2 = "
                         f"{(numel + 1) // 2} for a weight of {numel} elements")
    if numel >= 2**31:
        raise ValueError(f"weights of 2**31 or more elements are not supported, got {numel}")
    if not is_blocksize(blocksize):
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize!r}")
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"code must be the fp32 NF4 table of 16 values, got {code.dtype} "
                         f"with {code.numel()} elements")
    num_blocks = cdiv(numel, blocksize)
    if absmax.numel() != num_blocks:
        raise ValueError(f"absmax has {absmax.numel()} elements, expected ceil(numel / blocksize) "
                         f"= {num_blocks}")
    if absmax.dtype == torch.uint8:                    # double quantization
        if nested_absmax is None or nested_code is None or offset is None:
            raise ValueError("absmax is uint8 (double quantization): nested_absmax, nested_code "
                             "and offset are required")
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError(f"nested_code must be an fp32 table of 256 values, got "
                             f"{nested_code.dtype} with {nested_code.numel()} elements")
        n2 = cdiv(num_blocks, NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != n2:
            raise ValueError(f"nested_absmax must be fp32 with ceil(num_blocks / 256) = {n2} "
                             f"elements, got {nested_absmax.dtype} with {nested_absmax.numel()}")
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=device)
        if offset.numel() != 1 or offset.dtype != torch.float32:
            raise ValueError(f"offset must be one fp32 value, got {offset.dtype} with "
                             f"{offset.numel()} elements")
        double_quant = True
    elif absmax.dtype == torch.float32:
        if nested_absmax is not None or nested_code is not None:
            raise ValueError("absmax is fp32 (no double quantization): leave nested_absmax and "
                             "nested_code as None")
        nested_absmax = nested_code = offset = absmax     # never read
        double_quant = False
    else:
        raise TypeError(f"absmax must be uint8 (double quantized) or float32, got {absmax.dtype}")
    tensors = dict(packed=packed, absmax=absmax, code=code, nested_code=nested_code,
                   nested_absmax=nested_absmax, offset=offset)
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")
    flat = {k: v.reshape(-1).contiguous() for k, v in tensors.items()}
    return _NF4(**flat, blocksize=blocksize, double_quant=double_quant, numel=numel)


def _check_float(name: str, t, dtype=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} is {t.dtype}, expected {dtype} like the input")


def _rows(name: str, t: torch.Tensor, features: int, letter: str) -> tuple:
    """(leading shape, t as contiguous (rows, features)) after checking t's dtype and last dimension."""
    _check_float(name, t)
    if t.shape[-1] != features:
        raise ValueError(f"{name} has {t.shape[-1]} features in its last dimension, expected {letter} = {features}")
    return t.shape[:-1], t.reshape(-1, features).contiguous()


def _choose(kernel: str, M: int, K: int) -> bool:
    """True to run the decode kernels (nf4_gemv.py), False for the tile kernels."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if M == 0:
        return False
    if kernel == "decode" and not decode_supported(M, K):
        raise ValueError(f"kernel='decode' needs 1 <= M <= 16 rows and K % 8 == 0, got M={M}, K={K}")
    return kernel == "decode" or (kernel == "auto" and decode_supported(M, K))


def _words(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as int32 words of eight (same bytes; a copy only if misaligned)."""
    if packed.data_ptr() % 4:
        packed = packed.clone()
    return packed.view(torch.int32)


_COUNTERS = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for split_k.py, one set per device and stream; the kernels
    leave them at zero again."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


def _partials(plan, out: torch.Tensor) -> tuple:
    """(partial-sum buffer, arrival counters) for a decode plan writing `out` (M, C)."""
    partial = (torch.empty((plan.split, *out.shape), dtype=torch.float32, device=out.device)
               if plan.split > 1 else out)
    return partial, _counters(out.device, plan.grid[0])


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, *,
                   shape, dtype: torch.dtype = torch.float32, blocksize: int = 64,
                   nested_absmax: Optional[torch.Tensor] = None,
                   nested_code: Optional[torch.Tensor] = None,
                   offset: Union[torch.Tensor, float, None] = None) -> torch.Tensor:
    """W[j] = code[nibble_j] · absmax_fp32[j // blocksize], computed in fp32, cast to `dtype`.

    With double quantization (uint8 absmax):
    absmax_fp32[i] = nested_code[absmax[i]] · nested_absmax[i // 256] + offset.
    Bit-identical to the PyTorch reference. Returns a tensor of `shape` on packed's device.
    """
    shape = torch.Size(shape)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    q = _check_nf4(packed, absmax, code, shape.numel(), blocksize, nested_absmax, nested_code, offset)
    out = torch.empty(shape, dtype=dtype, device=q.packed.device)
    if q.numel == 0:
        return out
    fn = _runtime.kernel("nf4_dequant", "nf4_dequant_kernel", q.packed.device)
    plan = plan_dequant(q.numel, q.double_quant, _runtime.is_interpreted(fn))
    fn[plan.grid](*q.pointers(), out, q.numel, q.blocksize.bit_length() - 1,
                  **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages,
                  enable_fp_fusion=False)      # no FMA: round exactly like the reference
    return out


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, *,
               N: int, K: int, blocksize: int = 64,
               nested_absmax: Optional[torch.Tensor] = None,
               nested_code: Optional[torch.Tensor] = None,
               offset: Union[torch.Tensor, float, None] = None,
               bias: Optional[torch.Tensor] = None,
               lora_xa: Optional[torch.Tensor] = None, lora_B: Optional[torch.Tensor] = None,
               lora_scaling: float = 1.0, kernel: str = "auto") -> torch.Tensor:
    """Y = X · Wᵀ (+ bias) (+ lora_scaling · XA · lora_Bᵀ), W (N, K) stored as NF4.

    x: (..., K) fp32/bf16/fp16; returns (..., N) in x's dtype. W is dequantized tile by tile
    in registers and never written to memory. lora_xa = X · lora_Aᵀ with shape (..., R),
    lora_B (N, R): pass both to add the LoRA term in the same launch.
    kernel: "auto" runs the decode kernel (nf4_gemv.py) for M <= 16 rows and K % 8 == 0 and
    the tile kernel (nf4_matmul.py, W rounded to x's dtype as dequantize-then-matmul does)
    otherwise; "decode" or "tiles" forces one.
    """
    lead, x2 = _rows("x", x, K, "K")
    q = _check_nf4(packed, absmax, code, N * K, blocksize, nested_absmax, nested_code, offset,
                   device=x.device)
    M = x2.shape[0]
    if bias is not None:
        _check_float("bias", bias, x.dtype)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        bias = bias.contiguous()
    if (lora_xa is None) != (lora_B is None):
        raise ValueError("pass both lora_xa (X · lora_Aᵀ) and lora_B, or neither")
    R = 0
    if lora_xa is not None:
        _check_float("lora_xa", lora_xa, x.dtype)
        _check_float("lora_B", lora_B, x.dtype)
        R = lora_B.shape[-1]
        if lora_B.dim() != 2 or lora_B.shape[0] != N:
            raise ValueError(f"lora_B must have shape ({N}, R), got {tuple(lora_B.shape)}")
        if lora_xa.shape != (*lead, R):
            raise ValueError(f"lora_xa must have shape {(*lead, R)} (x's leading dims, rank R), "
                             f"got {tuple(lora_xa.shape)}")
        lora_xa = lora_xa.reshape(M, R).contiguous()
        lora_B = lora_B.contiguous()
    for name, t in (("bias", bias), ("lora_xa", lora_xa), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device} like x")
    decode = _choose(kernel, M, K)
    if M == 0:
        return x.new_empty((*lead, N))
    if decode:
        fn = _runtime.kernel("nf4_gemv", "nf4_gemv_kernel", x.device)
        plan = plan_gemv(M, N, K, blocksize=q.blocksize, dtype=x.dtype, double_quant=q.double_quant,
                         has_bias=bias is not None, has_lora=lora_xa is not None,
                         num_sms=_runtime.num_sms(x.device), interpreted=_runtime.is_interpreted(fn))
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        fn[plan.grid](x2, _words(q.packed), *q.pointers()[1:],
                      bias if bias is not None else x2, lora_xa if R else x2, lora_B if R else x2, y,
                      *_partials(plan, y), M, N, K, R, q.blocksize.bit_length() - 1, plan.chunk, plan.split,
                      float(lora_scaling), **plan.constexprs, num_warps=plan.num_warps,
                      num_stages=plan.num_stages)
        return y.reshape(*lead, N)

    fn = _runtime.kernel("nf4_matmul", "nf4_matmul_kernel", x.device)
    plan = plan_matmul(M, N, K, blocksize=q.blocksize, dtype=x.dtype, double_quant=q.double_quant,
                       has_bias=bias is not None, has_lora=lora_xa is not None,
                       num_sms=_runtime.num_sms(x.device), capability=_runtime.capability(x.device),
                       interpreted=_runtime.is_interpreted(fn))
    if plan.split == 1:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((plan.split, M, N), dtype=torch.float32, device=x.device)
    fn[plan.grid](x2, *q.pointers(),
                  bias if bias is not None else x2, lora_xa if R else x2, lora_B if R else x2, y,
                  M, N, K, R, K // 2, q.blocksize.bit_length() - 1, plan.chunk, float(lora_scaling),
                  **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages)
    if plan.split > 1:
        y = y.sum(dim=0).to(x.dtype)          # add the split-K partial sums, in fp32
    return y.reshape(*lead, N)


def nf4_matmul_dx(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                  code: torch.Tensor, *, N: int, K: int, blocksize: int = 64,
                  nested_absmax: Optional[torch.Tensor] = None,
                  nested_code: Optional[torch.Tensor] = None,
                  offset: Union[torch.Tensor, float, None] = None, kernel: str = "auto") -> torch.Tensor:
    """dX = dY · W, the input gradient of Y = X · Wᵀ, W (N, K) stored as NF4.

    dy: (..., N) fp32/bf16/fp16; returns (..., K) in dy's dtype. W tiles are dequantized in
    registers, as in nf4_matmul; `kernel` chooses between the decode and tile kernels the same way.
    """
    lead, dy2 = _rows("dy", dy, N, "N")
    q = _check_nf4(packed, absmax, code, N * K, blocksize, nested_absmax, nested_code, offset,
                   device=dy.device)
    M = dy2.shape[0]
    decode = _choose(kernel, M, K)
    if M == 0:
        return dy.new_empty((*lead, K))
    if decode:
        fn = _runtime.kernel("nf4_gemv", "nf4_gemv_dx_kernel", dy.device)
        plan = plan_gemv_dx(M, N, K, blocksize=q.blocksize, dtype=dy.dtype, double_quant=q.double_quant,
                            num_sms=_runtime.num_sms(dy.device), interpreted=_runtime.is_interpreted(fn))
        dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
        fn[plan.grid](dy2, _words(q.packed), *q.pointers()[1:], dx, *_partials(plan, dx),
                      M, N, K, q.blocksize.bit_length() - 1, plan.chunk, plan.split,
                      **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages)
        return dx.reshape(*lead, K)
    fn = _runtime.kernel("nf4_matmul_dx", "nf4_matmul_dx_kernel", dy.device)
    plan = plan_matmul_dx(M, N, K, blocksize=q.blocksize, dtype=dy.dtype,
                          double_quant=q.double_quant, num_sms=_runtime.num_sms(dy.device),
                          capability=_runtime.capability(dy.device),
                          interpreted=_runtime.is_interpreted(fn))
    if plan.split == 1:
        dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    else:
        dx = torch.empty((plan.split, M, K), dtype=torch.float32, device=dy.device)
    fn[plan.grid](dy2, *q.pointers(), dx, M, N, K, K // 2, q.blocksize.bit_length() - 1, plan.chunk,
                  **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages)
    if plan.split > 1:
        dx = dx.sum(dim=0).to(dy.dtype)
    return dx.reshape(*lead, K)
