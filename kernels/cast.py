"""Casting an fp32 tile to the output dtype, the same way on a GPU and in the interpreter.

A GPU converts fp32 -> bf16 with round-to-nearest-even. The Triton interpreter has no bf16
arithmetic and its fp32 -> bf16 conversion truncates, so under the interpreter (INTERPRET)
bf16 rounding is done by hand on the bit pattern: add 0x7FFF plus the lowest kept bit, then
drop the low 16 bits. fp16 and fp32 conversions are exact in both (numpy rounds correctly).
"""
import triton
import triton.language as tl


@triton.jit
def cast_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 tile `x` rounded to nearest-even in DTYPE (returned as DTYPE). Finite inputs only."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
