"""The format facts every part of minilora's quantization shares, each stated once.

    FLOAT_DTYPES      what a quantized tensor may come from and dequantize to: float32, float16, bfloat16
    blocksize rule    a 4-bit blocksize is a power of two from 32 to 4096 (the block of element j is j // blocksize)
    NESTED_BLOCKSIZE  double quantization: 256 block absmax values share one float32 nested absmax
    BLOCKSIZE_8BIT    8-bit optimizer state: blocks of 256 values, one float32 absmax each
    TINY              absmax is clamped to this before 1/absmax, as bitsandbytes does (all-zero blocks give s = 0)
    nf4_nbytes        bytes of n weights in NF4:  ⌈n/2⌉ codes + absmax (+ nested absmax + offset)
    kbit_nbytes       the same at k = 4 or 2 bits per code (NF2: ⌈n/4⌉ codes)
    ceil_div          ⌈n / k⌉ in integers: the blocks (pages, chunks) n elements fill

kernels/, the double quantization, int8 absmax and the memory estimate import these names.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096
NESTED_BLOCKSIZE = 256
BLOCKSIZE_8BIT = 256  # 8-bit optimizer state: one float32 absmax per block of 256 values
TINY = 1e-38



def ceil_div(n: int, k: int) -> int:
    """⌈n / k⌉ for ints n >= 0, k > 0, exactly (no float division): the blocks of k that n elements fill."""
    return -(-n // k)


def is_blocksize(blocksize) -> bool:
    """True for a power of two from MIN_BLOCKSIZE to MAX_BLOCKSIZE (an int, not a bool)."""
    return (isinstance(blocksize, int) and not isinstance(blocksize, bool)
            and MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE and blocksize & (blocksize - 1) == 0)


def check_blocksize(blocksize: int, name: str = "blocksize") -> int:
    """blocksize must be a power of two from 32 to 4096."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int (a power of two from 32 to 4096), got {blocksize!r}")
    if not is_blocksize(blocksize):
        raise ValueError(f"{name} must be a power of two from 32 to 4096, got {blocksize}")
    return blocksize


def check_float_tensor(x: torch.Tensor, name: str = "x", dtypes: tuple = FLOAT_DTYPES) -> None:
    """x must be a tensor of one of `dtypes` (default: float32, float16 or bfloat16)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"{name} must be {', '.join(names[:-1])} or {names[-1]}, got {x.dtype}")


def nf4_nbytes(n: int, blocksize: int = 64, double_quant: bool = True, blocksize2: int = NESTED_BLOCKSIZE) -> int:
    """Bytes of n weights in NF4: ⌈n/2⌉ packed codes + per-block absmax (1 byte each with double quantization,
    else 4) + with double quantization an fp32 absmax per blocksize2 blocks and an fp32 offset.
    n·(4 + 8/64 + 32/(64·256))/8 bytes plus rounding and the offset: 4.127 bits per weight. 0 for n = 0."""
    return kbit_nbytes(n, 4, blocksize, double_quant, blocksize2)


def kbit_nbytes(n: int, bits: int = 4, blocksize: int = 64, double_quant: bool = True,
                blocksize2: int = NESTED_BLOCKSIZE) -> int:
    """Bytes of n weights at `bits` (4 or 2) bits per code: ⌈n·bits/8⌉ packed codes plus the absmax values as
    in nf4_nbytes. At 2 bits with blocksize 64 and double quantization: 2.127 bits per weight."""
    if n < 0 or blocksize <= 0 or blocksize2 <= 0:
        raise ValueError(f"nf4_nbytes: n, blocksize and blocksize2 must be positive, got {n}, {blocksize}, {blocksize2}")
    if bits not in (4, 2):
        raise ValueError(f"kbit_nbytes: bits must be 4 or 2, got {bits!r}")
    if n == 0:
        return 0
    blocks, codes = math.ceil(n / blocksize), math.ceil(n * bits / 8)
    if not double_quant:
        return codes + 4 * blocks
    return codes + blocks + 4 * math.ceil(blocks / blocksize2) + 4
