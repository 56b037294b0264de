"""Round-trip error of the formats side by side: NF4, FP4, int4 (blockwise 4-bit) and int8 absmax.

    err_j = x_j - dequantize(quantize(x))_j;   reported: mean |err|, max |err|, RMSE / std(x), bits per parameter
"""
from __future__ import annotations

import torch

from .codebooks import get_code
from .int8 import dequantize_int8, quantize_int8
from .nf4 import dequantize_4bit, quantize_4bit

FORMATS = ("nf4", "fp4", "int4", "int8")


def roundtrip_errors(x: torch.Tensor, fmt: str, blocksize: int = 64, double_quant: bool = False) -> dict[str, float]:
    """Error statistics of one format on x (float32 comparison); int8 uses the same blocksize, no double quant."""
    x = x.detach().float()
    if fmt == "int8":
        q, absmax = quantize_int8(x, blocksize)
        back, bits = dequantize_int8(q, absmax, blocksize), 8 + 32 * absmax.numel() / x.numel()
    else:
        state = quantize_4bit(x, get_code(fmt), blocksize, double_quant)
        back, bits = dequantize_4bit(state), state.bits_per_param
    err = (x - back).abs()
    return {"format": fmt, "bits_per_param": bits, "mean_abs": err.mean().item(), "max_abs": err.max().item(),
            "rel_rmse": (err.square().mean().sqrt() / x.std()).item()}


def error_table(tensors: dict[str, torch.Tensor], formats: tuple[str, ...] = FORMATS, blocksize: int = 64,
                double_quant: bool = False) -> list[dict[str, float]]:
    """roundtrip_errors for every (data set, format); each tensor in `tensors` is one data set."""
    rows = []
    for name, x in tensors.items():
        for fmt in formats:
            rows.append({"data": name, **roundtrip_errors(x, fmt, blocksize, double_quant)})
    return rows
