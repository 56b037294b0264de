"""Dequantize a tile of an NF4 weight read as 32-bit words of eight codes (the decode kernels' loads).

nf4_tile.py addresses bytes; here each row of W (N × K, K a multiple of 8) is K / 8 int32 words,
bitsandbytes' layout unchanged: word w of row n holds W[n, 8w : 8w + 8]. Little-endian, so byte b
of the word is bits 8b..8b+7, and within a byte the first code is the high nibble:

    code of W[n, 8w + i] = (word >> 4·(i XOR 1)) & 0xF            i = 0..7 (shifts 4, 0, 12, 8, ...)
    W[n, k]              = code[that nibble] · absmax_fp32[(n·K + k) // BLOCKSIZE]

A tile is [BLOCK_N rows, BLOCK_K columns] = [BLOCK_N, BLOCK_K / 8] words: one 4-byte load per
eight weights (contiguous words coalesce into wider loads). The scales are read once per group
of GROUP consecutive codes of a row, not per code:

    GROUP = min(BLOCKSIZE, BLOCK_K)   when K % BLOCKSIZE == 0 (blocks start at row starts)
    GROUP = 8                         otherwise (a block may cross rows; a word never does,
                                      since 8 divides both K and BLOCKSIZE)

with double quantization absmax_fp32[i] = nested_code[absmax[i]] · nested_absmax[i // 256] + offset.
The NF4 table is a 16-value register tensor indexed with tl.gather, as in nf4_tile.py.
"""
import triton
import triton.language as tl


@triton.jit
def nf4_word_tile(words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, code,
                  offs_n, k0, N, K, log2_blocksize,
                  BLOCK_K: tl.constexpr, GROUP: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                  DOUBLE_QUANT: tl.constexpr):
    """W[offs_n, k0 : k0 + BLOCK_K] as fp32 [len(offs_n), BLOCK_K]; k0 is a multiple of BLOCK_K.
    Rows >= N and columns >= K come back as finite values; callers mask the other operand."""
    BN: tl.constexpr = offs_n.shape[0]
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    row_ok = offs_n < N
    row_words = K // 8

    # 1. One int32 load per eight codes, then eight 4-bit fields per word -> int32 [BN, BK].
    offs_w = k0 // 8 + tl.arange(0, WORDS)
    words = tl.load(words_ptr + (offs_n * row_words)[:, None] + offs_w[None, :],
                    mask=row_ok[:, None] & (offs_w[None, :] < row_words), other=0)
    shifts = (tl.arange(0, 8) ^ 1) * 4
    idx = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BN, BLOCK_K))

    # 2. The NF4 table: v = code[idx].
    v = tl.reshape(tl.gather(code, tl.reshape(idx, (BN * BLOCK_K,)), 0), (BN, GROUPS, GROUP))

    # 3. One scale per group of GROUP codes: [BN, GROUPS].
    offs_g = k0 + tl.arange(0, GROUPS) * GROUP
    blk = ((offs_n * K)[:, None] + offs_g[None, :]) >> log2_blocksize
    blk_ok = row_ok[:, None] & (offs_g[None, :] < K)
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
        c2 = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=blk_ok, other=0.0)
        scale = tl.load(nested_code_ptr + q) * c2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)

    # 4. W = code · absmax in fp32.
    return tl.reshape(v * scale[:, :, None], (BN, BLOCK_K))
