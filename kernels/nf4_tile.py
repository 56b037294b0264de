"""Dequantize one tile of an NF4 weight, in registers, inside a Triton kernel.

Every matmul kernel in minilora.kernels calls `nf4_tile`: it is where the 4-bit codes become
numbers. The weight W (N rows × K columns) is stored flat and row-major, so element W[n, k]
has flat index j = n·K + k, and

    packed[j // 2]                 holds its 4-bit code (even j in the high nibble, odd j low)
    absmax_fp32[j // BLOCKSIZE]    is its block's scale
    W[n, k] = code[nibble_j] · absmax_fp32[j // BLOCKSIZE]                            (NF4)

With double quantization the block scales are themselves 8-bit codes:

    absmax_fp32[i] = nested_code[absmax[i]] · nested_absmax[i // NESTED_BLOCKSIZE] + offset

All arithmetic is fp32, in that order (multiply, then add the offset; code times scale), which
is what the PyTorch reference computes. The 16-entry NF4 table is passed in as a register
tensor (`code`, loaded once per program) and indexed with tl.gather, which Triton serves from
shared memory or warp shuffles: a per-element tl.load from the table in global memory was
1.1x to 1.3x slower on an H100 (the software pipeliner turns it into 4-byte async copies).
"""
import triton
import triton.language as tl


@triton.jit
def nf4_tile(packed_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, code,
             offs_n, k0, N, K, row_bytes, log2_blocksize,
             BLOCK_K: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
             DOUBLE_QUANT: tl.constexpr, SCALE_PER_ROW: tl.constexpr, PAIRED: tl.constexpr):
    """Return W[offs_n, k0 : k0 + BLOCK_K] as an fp32 tile of shape [len(offs_n), BLOCK_K].

    code:           fp32 [16], the NF4 table
    offs_n:         [BLOCK_N] row indices (rows >= N read as zero scale)
    k0:             first column of the tile, a multiple of BLOCK_K
    row_bytes:      K // 2, bytes per row of `packed` (used when PAIRED)
    log2_blocksize: BLOCKSIZE = 2**log2_blocksize, so j // BLOCKSIZE is a shift
    PAIRED:         K is even, so every row starts on a byte boundary and the tile is a plain
                    [BLOCK_N, BLOCK_K // 2] rectangle of bytes, two codes per byte
    SCALE_PER_ROW:  K % BLOCKSIZE == 0 and BLOCK_K divides BLOCKSIZE, so the tile's slice of
                    each row lies inside one quantization block: one scale per row
    Columns >= K come back as finite values; callers zero the other operand there.
    """
    BN: tl.constexpr = offs_n.shape[0]
    row_ok = offs_n < N                                   # [BN]
    row_start = offs_n * K                                # flat index of W[n, 0]
    offs_k = k0 + tl.arange(0, BLOCK_K)

    # 1. The 4-bit codes of the tile -> int32 [BN, BK].
    if PAIRED:
        # Load each byte once and split it: the high nibble is column k, the low one k + 1.
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)     # byte columns within the row
        b = tl.load(packed_ptr + (offs_n * row_bytes)[:, None] + offs_b[None, :],
                    mask=row_ok[:, None] & (offs_b[None, :] < row_bytes), other=0)
        idx = tl.reshape(tl.join(b >> 4, b & 0xF), (BN, BLOCK_K)).to(tl.int32)
    else:
        # Odd K: a row may start in the middle of a byte, so address every element.
        j = row_start[:, None] + offs_k[None, :]          # flat element index [BN, BK]
        b = tl.load(packed_ptr + j // 2, mask=row_ok[:, None] & (offs_k[None, :] < K), other=0)
        idx = (b.to(tl.int32) >> (4 - 4 * (j % 2))) & 0xF

    # 2. Look the codes up in the NF4 table: v = code[idx].
    v = tl.reshape(tl.gather(code, tl.reshape(idx, (BN * BLOCK_K,)), 0), (BN, BLOCK_K))

    # 3. The block scales: one per row, or one per element when blocks cross rows.
    if SCALE_PER_ROW:
        blk = (row_start + k0) >> log2_blocksize          # [BN]
        blk_ok = row_ok
    else:
        blk = (row_start[:, None] + offs_k[None, :]) >> log2_blocksize   # [BN, BK]
        blk_ok = row_ok[:, None] & (offs_k[None, :] < K)
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)    # 8-bit code
        c2 = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=blk_ok, other=0.0)
        scale = tl.load(nested_code_ptr + q) * c2 + tl.load(offset_ptr)
        scale = tl.where(blk_ok, scale, 0.0)
    else:
        scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)
    if SCALE_PER_ROW:
        scale = scale[:, None]

    # 4. W = code · absmax (fp32). The caller rounds it to the matmul dtype.
    return v * scale
