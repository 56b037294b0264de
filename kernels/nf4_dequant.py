"""NF4 dequantization kernel: packed 4-bit codes -> a dense fp32/bf16/fp16 weight.

Tiling: the weight is treated as one flat vector of numel elements; each program handles
BLOCK consecutive elements = BLOCK // 2 consecutive bytes of `packed`. It reads the bytes,
splits each into its two nibbles, looks them up in the NF4 table, multiplies by the block
scale (double-dequantized first when the scales are 8-bit) and writes the result.

Launched with FP fusion off so that `nested_code[q] * nested_absmax + offset` and
`code * absmax` round exactly as the PyTorch reference does (no fused multiply-add):
the output is bit-identical to it.
"""
import triton
import triton.language as tl

from .cast import cast_to


@triton.jit
def nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
                       offset_ptr, out_ptr, numel, log2_blocksize,
                       BLOCK: tl.constexpr,
                       NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    # Bytes [pid·BLOCK/2, (pid+1)·BLOCK/2) hold elements [pid·BLOCK, (pid+1)·BLOCK).
    offs_b = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    b = tl.load(packed_ptr + offs_b, mask=offs_b < (numel + 1) // 2, other=0)
    # element 2i is the high nibble of byte i, element 2i + 1 the low one
    idx = tl.reshape(tl.join(b >> 4, b & 0xF), (BLOCK,)).to(tl.int32)
    j = pid * BLOCK + tl.arange(0, BLOCK)                    # flat element index
    ok = j < numel

    v = tl.gather(tl.load(code_ptr + tl.arange(0, 16)), idx, 0)   # NF4 value code[idx]
    blk = j >> log2_blocksize                                # quantization block of element j
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        c2 = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=ok, other=0.0)
        scale = tl.load(nested_code_ptr + q) * c2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    w = v * scale                                             # fp32, then one rounding below
    tl.store(out_ptr + j, cast_to(w, out_ptr.dtype.element_ty, INTERPRET), mask=ok)
