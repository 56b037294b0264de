"""Decode-shaped NF4 kernels (M <= 16 rows): Y = X · Wᵀ and dX = dY · W at the memory roofline.

With few rows of X the matmul does M multiply-adds per weight and is bound by reading W:
0.5 byte of code plus the double-quantized scales, 0.516 byte per weight, against 2 for a bf16
W, so the best a kernel can do is 2 / 0.516 = 3.88x a bf16 matmul. These kernels are built to
stream W and nothing else:

* W is read as int32 words of eight codes, the scales once per group of codes (nf4_words.py);
  bitsandbytes' layout as it is, so there is no repacking (K must be a multiple of 8).
* Each program owns BLOCK_N rows of W (forward) or BLOCK_K columns (dX) and a slice of the
  reduction: split-K, sized so that every SM streams (configs.py). The slices are added up in
  the same launch by the program that finishes last (split_k.py).
* No tensor cores for M <= 2 (USE_DOT off): each row of the output is a multiply-add per weight
  on the CUDA cores, in fp32 on the un-rounded W, reduced across the tile (fma_rows). For
  3 <= M <= 16 in bf16/fp16, 16 rows make one mma tile, and tl.dot on W rounded to X's dtype
  is cheaper than 16 multiply-adds per weight (fp32 stays on multiply-adds: exact fp32).
* Bias and the LoRA term scaling · XA · Bᵀ are added once, by the program that writes Y.

nf4_matmul.py / nf4_matmul_dx.py (tiles of bytes, one scale per element or row) are the
readable reference these kernels are tested against. INTERPRET: see nf4_matmul.py.
"""
import triton
import triton.language as tl

from .cast import cast_to
from .nf4_words import nf4_word_tile
from .split_k import split_k_combine


# tl.sum's own combine function: the compiler reduces with it, and the interpreter recognises it
# and sums with NumPy (a combine function of our own would be called once per element there).
_add = tl.standard._sum_combine


@triton.jit
def fma_rows(acc, a_ptr, a_stride, offs_a, a_len, b, scale, offs_m, M, B_AXIS: tl.constexpr):
    """acc[m, c] += scale · Σ_i a[m, i] · b[c, i] (B_AXIS 1) or b[i, c] (B_AXIS 0), on the CUDA
    cores: one fp32 multiply-add per element of b and row of a, then a sum across the tile.
    Row m < M of a is a_ptr[m · a_stride + offs_a] (entries >= a_len read as 0). A run-time loop
    over the rows: one row of a live at a time, whatever BLOCK_M is."""
    for m in range(0, M):
        a = tl.load(a_ptr + m * a_stride + offs_a, mask=offs_a < a_len, other=0.0).to(tl.float32) * scale
        if B_AXIS == 1:
            part = tl.reduce(b * a[None, :], 1, _add)
        else:
            part = tl.reduce(b * a[:, None], 0, _add)
        acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
    return acc


@triton.jit
def nf4_gemv_kernel(x_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
                    offset_ptr, bias_ptr, xa_ptr, lora_b_ptr, y_ptr, partial_ptr, counter_ptr,
                    M, N, K, R, log2_blocksize, k_per_split, num_splits, lora_scaling,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, USE_DOT: tl.constexpr, SPLIT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Y (M, N) = X (M, K) · Wᵀ (+ bias) (+ lora_scaling · XA · lora_Bᵀ); program (n tile, split)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    code = tl.load(code_ptr + tl.arange(0, 16))               # the NF4 table, in registers
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)

    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = nf4_word_tile(words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                          code, offs_n, k0, N, K, log2_blocksize, BLOCK_K, GROUP,
                          NESTED_BLOCKSIZE, DOUBLE_QUANT)                        # [BN, BK] fp32
        if USE_DOT:
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = cast_to(w, x_ptr.dtype.element_ty, INTERPRET)
            if INTERPRET:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            acc = fma_rows(acc, x_ptr, K, offs_k, K, w, 1.0, offs_m, M, 1)

    if SPLIT:
        acc, last = split_k_combine(acc, partial_ptr, counter_ptr + pid_n, pid_s, num_splits,
                                    offs_m, offs_n, M, N)
    else:
        last = pid_s == 0
    if last:                                                  # the program that writes Y
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if HAS_LORA:
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                lb = tl.load(lora_b_ptr + offs_n[:, None] * R + offs_r[None, :],
                             mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
                acc = fma_rows(acc, xa_ptr, R, offs_r, R, lb.to(tl.float32), lora_scaling, offs_m, M, 1)
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :],
                 cast_to(acc, y_ptr.dtype.element_ty, INTERPRET),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def nf4_gemv_dx_kernel(dy_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
                       offset_ptr, dx_ptr, partial_ptr, counter_ptr,
                       M, N, K, log2_blocksize, n_per_split, num_splits,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                       DOUBLE_QUANT: tl.constexpr, USE_DOT: tl.constexpr, SPLIT: tl.constexpr,
                       INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dX (M, K) = dY (M, N) · W; program (k tile, split of N). The same W tiles as the forward,
    reduced over rows instead of columns."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    code = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)

    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        w = nf4_word_tile(words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                          code, offs_n, k0, N, K, log2_blocksize, BLOCK_K, GROUP,
                          NESTED_BLOCKSIZE, DOUBLE_QUANT)                        # [BN, BK] fp32
        if USE_DOT:
            dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :],
                         mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
            w = cast_to(w, dy_ptr.dtype.element_ty, INTERPRET)
            if INTERPRET:
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        else:
            acc = fma_rows(acc, dy_ptr, N, offs_n, N, w, 1.0, offs_m, M, 0)

    if SPLIT:
        acc, last = split_k_combine(acc, partial_ptr, counter_ptr + pid_k, pid_s, num_splits,
                                    offs_m, offs_k, M, K)
    else:
        last = pid_s == 0
    if last:
        tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :],
                 cast_to(acc, dx_ptr.dtype.element_ty, INTERPRET),
                 mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
