"""NF4Linear: a linear layer whose frozen weight is stored as NF4 with double quantization, and the matmul
against it (with QLoRA's adapter term) that autograd runs without keeping a dense copy of the weight.

    Y = X · doubleDequant(c1, c2, W_nf4)ᵀ + b + scaling · (X · Aᵀ) · Bᵀ

The 16-bit copy of W exists only inside the matmul: autograd keeps the packed 4-bit weight and dequantizes it
again in backward (dX = dY · W), so the frozen base costs ~0.52 bytes per weight in memory, not 2.
The matmuls run in PyTorch or, on a GPU, in minilora's Triton kernels (resolve_backend). With bits=2 the weight
is NF2 (quant/nf2.py, ~0.27 bytes per weight) and the matmul always runs in PyTorch: the kernels read NF4 only.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn

from .quant import dequantize_nf, quantize_nf

BACKENDS = ("auto", "torch", "triton")
_STATE_TENSORS = ("packed", "absmax", "nested_absmax", "offset")  # per-layer storage, kept as buffers
_CODEBOOKS = ("code", "nested_code")  # format constants (16 + 256 values), one copy per device for all layers
_CODEBOOK_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _codebook_on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    key = (id(table), device)
    if key not in _CODEBOOK_CACHE:
        _CODEBOOK_CACHE[key] = table.to(device)
    return _CODEBOOK_CACHE[key]


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on a CUDA device with Triton installed, else 'torch'; MINILORA_BACKEND overrides auto."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("MINILORA_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"MINILORA_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        try:
            import triton  # noqa: F401
            return "triton" if device.type == "cuda" else "torch"
        except ImportError:
            return "torch"
    return backend


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 (+ double quantization; NF2 when its state has
    bits=2). Y = X · deq(W)ᵀ + b."""

    def __init__(self, state, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16,
                 backend: str = "auto"):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight state, got shape {tuple(state.shape)}")
        if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype}")
        resolve_backend(backend, torch.device("cpu"))  # validate the name early
        self.out_features, self.in_features = state.shape
        self.compute_dtype, self.backend, self.bits = compute_dtype, backend, getattr(state, "bits", 4)
        if self.bits == 2 and backend == "triton":
            raise ValueError("backend='triton' runs NF4 only; a 2-bit (NF2) layer runs in PyTorch: use 'auto' or 'torch'")
        self._state = state  # scalars and metadata; tensors live in buffers so .to(device) moves them
        for name in _STATE_TENSORS:
            value = getattr(state, name, None)
            self.register_buffer(name, value if isinstance(value, torch.Tensor) else None)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16, backend: str = "auto", bits: int = 4) -> "NF4Linear":
        """Quantize linear.weight to NF4 (bits=2: NF2) (blockwise absmax, optionally double-quantized)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        state = quantize_nf(linear.weight.detach(), bits, blocksize=blocksize, double_quant=double_quant)
        return cls(state, linear.bias, compute_dtype, backend)

    def quant_state(self):
        """The QuantState with this module's (possibly moved) buffers and the codebooks on the same device."""
        fields = {n: getattr(self, n) for n in _STATE_TENSORS if getattr(self, n) is not None}
        for n in _CODEBOOKS:
            if isinstance(getattr(self._state, n, None), torch.Tensor):
                fields[n] = _codebook_on(getattr(self._state, n), self.packed.device)
        return dataclasses.replace(self._state, **fields)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """doubleDequant(c1, c2, W_nf4) as a dense (out, in) tensor."""
        return dequantize_nf(self.quant_state(), dtype or self.compute_dtype)

    @property
    def quantized_nbytes(self) -> int:
        """Bytes this layer stores for its weight: packed codes, (quantized) absmax, nested absmax, offset."""
        return self.quant_state().nbytes

    def to_linear(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A frozen dense nn.Linear in the original dtype holding weight (default: the dequantized weight)."""
        w = self.dequantized_weight(torch.float32) if weight is None else weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=self._state.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocksize={self._state.blocksize}, compute_dtype={self.compute_dtype}, backend={self.backend}"
                + (", bits=2" if self.bits == 2 else ""))


# ---- the matmuls against the packed weight: PyTorch reference or Triton kernels ----

# Up to this many rows the fused kernel wins (memory-bound: it reads 0.52 B per weight instead of 2). Above
# it the GEMM is compute-bound and re-dequantizing W for every row block costs more than one dequantization
# into a temporary followed by cuBLAS (measured on an H100: fused 1.5-2.6x slower at M = 512 and 4096).
FUSED_MAX_M = 64


def _dequantized(base: NF4Linear, backend: str, dtype: torch.dtype) -> torch.Tensor:
    """deq(W) as a temporary (out, in) tensor, by the Triton dequant kernel or by PyTorch."""
    if backend == "triton":
        from .kernels import nf4_dequantize_state
        return nf4_dequantize_state(base.quant_state(), dtype=dtype)
    return base.dequantized_weight(dtype)


def _base_forward(x, base: NF4Linear, backend: str, bias, xa, lora_B, scaling) -> torch.Tensor:
    """X · deq(W)ᵀ + b + scaling · XA · Bᵀ, (M, in) -> (M, out). For small M the Triton kernel dequantizes
    inside the matmul and adds the bias and the LoRA term in the same launch; otherwise W is dequantized to a
    temporary and multiplied."""
    if backend == "triton" and x.shape[0] <= FUSED_MAX_M:
        from .kernels import nf4_matmul_state
        return nf4_matmul_state(x, base.quant_state(), bias=None if bias is None else bias.to(x.dtype),
                                lora_xa=xa, lora_B=lora_B, lora_scaling=scaling)
    y = x @ _dequantized(base, backend, x.dtype).t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    if xa is not None:
        y = y + scaling * (xa @ lora_B.t())
    return y


def _base_matmul_dx(dy: torch.Tensor, base: NF4Linear, backend: str) -> torch.Tensor:
    """dY · deq(W), (M, out) -> (M, in): the input gradient, W dequantized again rather than saved."""
    if backend == "triton" and dy.shape[0] <= FUSED_MAX_M:
        from .kernels import nf4_matmul_dx_state
        return nf4_matmul_dx_state(dy, base.quant_state())
    return dy @ _dequantized(base, backend, dy.dtype)


class _NF4LinearFunction(torch.autograd.Function):
    """Forward Y = X deq(W)ᵀ + b + s·(X_d Aᵀ)Bᵀ; saves X, X_d, A, B and the packed weight, never deq(W).
    Backward: dX = dY deq(W) (+ the adapter path), dA = s·(dY B)ᵀ X_d, dB = s·dYᵀ (X_d Aᵀ), db = Σ_rows dY (a
    bias trains only when its requires_grad is set; the base weight never does)."""

    @staticmethod
    def forward(ctx, x, x_lora, lora_A, lora_B, bias, scaling, base, backend):
        xa = x_lora @ lora_A.t() if lora_A is not None else None   # (M, r)
        y = _base_forward(x, base, backend, bias, xa, lora_B, scaling)  # (M, out)
        ctx.base, ctx.backend, ctx.scaling = base, backend, scaling
        ctx.bias_dtype = bias.dtype if bias is not None else None
        packed = [getattr(base, n) for n in _STATE_TENSORS if getattr(base, n) is not None]
        ctx.save_for_backward(x_lora if xa is not None else None, xa, lora_A, lora_B, *packed)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_lora, xa, lora_A, lora_B = ctx.saved_tensors[:4]
        base, s = ctx.base, ctx.scaling
        dx = dx_lora = dA = dB = db = None
        if ctx.needs_input_grad[4]:
            db = dy.float().sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            dx = _base_matmul_dx(dy, base, ctx.backend)
        if lora_A is not None:
            d_xa = s * (dy @ lora_B)                       # (M, r)
            if ctx.needs_input_grad[1]:
                dx_lora = d_xa @ lora_A                    # (M, in)
            if ctx.needs_input_grad[2]:
                dA = d_xa.t() @ x_lora                     # (r, in)
            if ctx.needs_input_grad[3]:
                dB = s * (dy.t() @ xa)                     # (out, r)
        return dx, dx_lora, dA, dB, db, None, None, None


def nf4_linear(x: torch.Tensor, base: NF4Linear, lora_A: torch.Tensor | None = None,
               lora_B: torch.Tensor | None = None, scaling: float = 0.0,
               x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X · deq(W)ᵀ + b for X of any leading shape, computed in base.compute_dtype; given an adapter (QLoRA's
    term), + scaling · (X_lora Aᵀ) Bᵀ in the same pass, so the fused kernels add it in their epilogue."""
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor (as for nn.Linear), got {x.dtype}")
    if x.shape[-1] != base.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {base.in_features}")
    lead, dt = x.shape[:-1], base.compute_dtype
    backend = "torch" if base.bits == 2 else resolve_backend(base.backend, x.device)
    x2 = x.reshape(-1, base.in_features).to(dt)
    xl = x2 if x_lora is None else x_lora.reshape(-1, base.in_features).to(dt)
    a = lora_A.to(dt) if lora_A is not None else None
    b = lora_B.to(dt) if lora_B is not None else None
    y = _NF4LinearFunction.apply(x2, xl, a, b, base.bias, scaling, base, backend)
    return y.reshape(*lead, base.out_features).to(x.dtype)
