"""PiSSA and LoftQ: start A and B from the weight itself instead of from noise and zero.

PiSSA (Meng et al., 2024) puts the principal part of W into the adapter and freezes the rest:

    W = U S Vᵀ,   B = U_r √(S_r / s),   A = √(S_r / s) V_rᵀ,   W_res = W − s·B A      (s = the LoRA scaling)

so the layer starts equal to W while training moves the r directions that matter most. Over a 4-bit base
(QPiSSA) it is W_res that gets quantized: its spread is smaller than W's, so its rounding error is too.

LoftQ (Li et al., 2023) chooses Q and B A together so that Q + s·B A approximates W, alternating

    Q_t = NF4(W − s·B_{t−1} A_{t−1}),   s·B_t A_t = rank-r SVD of (W − deq(Q_t)),   starting from B_0 A_0 = 0,

for loftq_iter steps: one step is plain NF4 plus the best rank-r correction of its error. At 2 bits the same
rounds alternate NF2 (quant/nf2.py) and the SVD: LoftQ quantizes with the quantizer of the base it builds. PEFT splits the SVD
as √S on both sides without the scaling (so Q + B A ≈ W); dividing by s keeps Q + s·B A ≈ W at any alpha and
is the same when alpha = r.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..nf4_linear import NF4Linear
from ..quant import dequantize_nf, quantize_nf


# Machinery: a CPU SVD of a small matrix runs on one thread. On 2 busy cores, 2 threads took 0.43 s for a 256 × 64
# SVD and one thread 0.7 ms (threads waiting on each other); above about a million entries threads pay off.
SMALL = 1 << 20


@contextmanager
def one_thread(when: bool = True):
    before = torch.get_num_threads()
    if when:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def split_svd(m: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in), B (out, r) with s·B A the best rank-r approximation of m (Eckart–Young), √S on each side."""
    with one_thread(m.numel() <= SMALL):
        u, sv, vh = torch.linalg.svd(m.float(), full_matrices=False)
    root = (sv[:r] / scaling).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


@torch.no_grad()
def pissa(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res): the r principal singular directions of W as the adapter, the rest as the frozen base."""
    w = weight.float()
    a, b = split_svd(w, r, scaling)
    return a, b, w - scaling * (b @ a)


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, scaling: float, iters: int, quantize: Callable, dequantize: Callable):
    """(A, B, state): state = quantize(W − s·B A) and s·B A ≈ W − dequantize(state), after `iters` rounds."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq_iter must be an int >= 1, got {iters!r}")
    w = weight.float()
    correction = torch.zeros_like(w)                # s·B A, zero before the first round
    for _ in range(iters):
        state = quantize((w - correction).to(weight.dtype))
        a, b = split_svd(w - dequantize(state).float(), r, scaling)
        correction = scaling * (b @ a)
    return a, b, state


# ---- machinery: the two inits applied to the layers of a model (add_qlora, load_qlora_adapter) ----

def quantized_start(linear: nn.Linear, init: str, r: int, scaling: float, loftq_iter: int = 1, blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16, bits: int = 4):
    """(NF4Linear, A, B) for one nn.Linear: PiSSA quantizes the residual W − s·B A; LoftQ alternates. bits: 4
    (NF4) or 2 (NF2), the base's format and LoftQ's quantizer."""
    w = linear.weight.detach()
    quantize = lambda m: quantize_nf(m, bits, blocksize=blocksize, double_quant=double_quant)  # noqa: E731
    if init == "pissa":
        a, b, w_res = pissa(w, r, scaling)
        state = quantize(w_res.to(w.dtype))
    else:
        a, b, state = loftq(w, r, scaling, loftq_iter, quantize, lambda st: dequantize_nf(st, torch.float32))
    return NF4Linear(state, linear.bias, compute_dtype), a, b


@torch.no_grad()
def set_adapter_start(model: nn.Module, starts: dict, init: str, loftq_iter: int) -> None:
    """Copy PiSSA's / LoftQ's A and B into the layers (DoRA's magnitude follows: m = ‖W0 + s·B A‖)."""
    for name, (a, b) in starts.items():
        layer = model.get_submodule(name)
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        layer.init, layer.loftq_iter = init, loftq_iter if init == "loftq" else None
        if hasattr(layer, "lora_magnitude_vector"):
            layer.lora_magnitude_vector.copy_(layer.weight_norm())
