"""Fused NF4 dequant-matmul, forward pass:  Y = X · Wᵀ (+ bias) (+ scaling · XA · Bᵀ).

X: (M, K) activations, W: (N, K) NF4 weight, Y: (M, N). W is read as packed 4-bit codes
(0.5 byte per weight plus the block constants) and dequantized in registers by `nf4_tile`
inside the K loop; a 16-bit copy of W never exists in memory.

Tiling: each program owns a [BLOCK_M, BLOCK_N] tile of Y and walks K in BLOCK_K steps. Per
step it loads the X tile, dequantizes the matching [BLOCK_N, BLOCK_K] tile of W, rounds it
to X's dtype (bf16 on the GPU, exactly as dequantize-then-matmul would) and accumulates
tl.dot(X, Wᵀ) in fp32 on the tensor cores. Programs run in groups GROUP_M tiles tall, so
neighbouring programs reuse the same W tiles from L2.

Two uses of the same kernel (configs.py picks by M):
* small M (decoding, M <= 64): BLOCK_M = 16..64, and split-K (grid axis 1): the K loop is cut
  into `k_per_split` chunks so that enough programs stream W to keep every SM busy. Each split
  writes fp32 partial sums to its own slice of a (SPLIT_K, M, N) buffer, which the caller adds
  up (deterministic, no atomics); bias and LoRA are added by split 0 only.
* training-size M: 128 x 128 tiles, no split.

The LoRA term expects XA = X · Aᵀ (M, R) computed beforehand and lora_B (N, R); it is added in
the epilogue, so Y is written once.

INTERPRET is set when running under the Triton interpreter, which has no bf16 arithmetic:
tl.dot operands are then widened to fp32 (after W was rounded to X's dtype, so they are the
same numbers a GPU multiplies) and bf16 rounding is done on the bits (cast.py).
"""
import triton
import triton.language as tl

from .cast import cast_to
from .nf4_tile import nf4_tile


@triton.jit
def nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
                      offset_ptr, bias_ptr, xa_ptr, lora_b_ptr, y_ptr,
                      M, N, K, R, row_bytes, log2_blocksize, k_per_split, lora_scaling,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                      DOUBLE_QUANT: tl.constexpr, SCALE_PER_ROW: tl.constexpr, PAIRED: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                      INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles share each column of W tiles while it is in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)                                  # which slice of K (split-K)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    code = tl.load(code_ptr + tl.arange(0, 16))               # the NF4 table, in registers
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)      # [BM, BK]
        # Dequantize the matching W tile in registers: W[offs_n, k0:k0+BK] -> [BN, BK].
        w = nf4_tile(packed_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                     code, offs_n, k0, N, K, row_bytes, log2_blocksize, BLOCK_K,
                     NESTED_BLOCKSIZE, DOUBLE_QUANT, SCALE_PER_ROW, PAIRED)
        w = cast_to(w, x_ptr.dtype.element_ty, INTERPRET)     # bf16 on the GPU, like the reference
        if INTERPRET:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    # Epilogue (added by split 0 only): bias and the LoRA term scaling · XA · Bᵀ.
    first = (pid_k == 0).to(tl.float32)                      # 1 in split 0, else 0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
        acc += first * bias.to(tl.float32)[None, :]
    if HAS_LORA:
        # acc += (scaling · XA) · Bᵀ, XA scaled in fp32 and rounded once to X's dtype; splits
        # other than 0 scale it by 0. Accumulating into acc needs no second accumulator tile.
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            xa = tl.load(xa_ptr + offs_m[:, None] * R + offs_r[None, :],
                         mask=m_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            lb = tl.load(lora_b_ptr + offs_n[:, None] * R + offs_r[None, :],
                         mask=n_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            xa = cast_to(xa.to(tl.float32) * (first * lora_scaling), x_ptr.dtype.element_ty, INTERPRET)
            if INTERPRET:
                xa = xa.to(tl.float32)
                lb = lb.to(tl.float32)
            acc = tl.dot(xa, tl.trans(lb), acc, input_precision=DOT_PRECISION)

    # y_ptr is Y itself (one split) or split pid_k's fp32 slice of the partial-sum buffer.
    y_ptrs = y_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, cast_to(acc, y_ptr.dtype.element_ty, INTERPRET),
             mask=m_ok[:, None] & n_ok[None, :])
