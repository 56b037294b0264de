"""Fused NF4 dequant-matmul, forward pass:  Y = X · Wᵀ (+ bias) (+ scaling · XA · Bᵀ).

X: (M, K) activations, W: (N, K) NF4 weight, Y: (M, N). W is read as packed 4-bit codes
(0.5 byte per weight plus the block constants) and dequantized in registers by `nf4_tile`
inside the K loop; a 16-bit copy of W never exists in memory.

Two kernels, picked by M (see configs.py):

* `nf4_gemv_kernel`, M <= 4 (decoding). No tensor cores: each program owns BLOCK_N rows of
  W and walks along K, multiplying the dequantized tile by the few rows of X with plain FMAs
  and reducing over K. The work is reading W; split-K (grid axis 1) adds programs when N
  alone gives too few to keep every SM streaming.
* `nf4_matmul_kernel`, larger M. Classic tiled matmul: each program owns a
  [BLOCK_M, BLOCK_N] tile of Y, loops over K in BLOCK_K steps, loads the X tile, dequantizes
  the matching [BLOCK_N, BLOCK_K] tile of W and accumulates tl.dot(X, Wᵀ) in fp32. Programs
  are grouped GROUP_M tiles tall so neighbouring programs reuse W tiles from L2. Small M
  (decoding with a batch) uses the same kernel with BLOCK_M = 16..64 and split-K.

With split-K > 1 each program writes fp32 partial sums to its own slice of a
(SPLIT_K, M, N) buffer that the caller adds up (deterministic, no atomics); bias and the
LoRA term are added by split 0 only. The LoRA term expects XA = X · Aᵀ (M, R) computed
beforehand and lora_B (N, R); it is added in the epilogue, so Y is written once.

INTERPRET is set when running under the Triton interpreter, which has no bf16 arithmetic:
tl.dot operands are then widened to fp32 (after W was rounded to X's dtype, so they are the
same numbers a GPU multiplies) and bf16 rounding is done on the bits (cast.py).
"""
import triton
import triton.language as tl

from .cast import cast_to
from .nf4_tile import nf4_tile

# tl.reduce(..., _add) is tl.sum: Triton's own combiner, which the interpreter recognises and
# hands to numpy. (tl.sum itself is a @jit library function; see _runtime.py for why these
# kernels call only Triton builtins.)
_add = tl.standard._sum_combine


@triton.jit
def nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
                    offset_ptr, bias_ptr, xa_ptr, lora_b_ptr, y_ptr,
                    M, N, K, R, row_bytes, log2_blocksize, k_per_split, lora_scaling,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, SCALE_PER_ROW: tl.constexpr, PAIRED: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, INTERPRET: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)                                  # which slice of K (split-K)
    offs_m = tl.arange(0, BLOCK_M)                            # all rows of X at once
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)      # [BM, BK]
        # Dequantize W[offs_n, k0:k0+BK] in registers, rounded to X's dtype like the reference.
        w = nf4_tile(packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
                     offset_ptr, offs_n, k0, N, K, row_bytes, log2_blocksize, BLOCK_K,
                     NESTED_BLOCKSIZE, DOUBLE_QUANT, SCALE_PER_ROW, PAIRED)
        w = cast_to(w, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)          # [BN, BK]
        # y[m, n] += sum_k x[m, k] · w[n, k]
        acc += tl.reduce(x.to(tl.float32)[:, None, :] * w[None, :, :], 2, _add)

    # Epilogue (split 0 only): bias and the LoRA term scaling · XA · Bᵀ.
    first = (pid_k == 0).to(tl.float32)                      # 1 in split 0, else 0
    n_ok = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
        acc += first * bias.to(tl.float32)[None, :]
    if HAS_LORA:
        lora = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            xa = tl.load(xa_ptr + offs_m[:, None] * R + offs_r[None, :],
                         mask=m_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            lb = tl.load(lora_b_ptr + offs_n[:, None] * R + offs_r[None, :],
                         mask=n_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            lora += tl.reduce(xa.to(tl.float32)[:, None, :] * lb.to(tl.float32)[None, :, :], 2, _add)
        acc += (first * lora_scaling) * lora

    # y_ptr is Y itself (one split) or split pid_k's fp32 slice of the partial-sum buffer.
    y_ptrs = y_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, cast_to(acc, y_ptr.dtype.element_ty, INTERPRET), mask=m_ok[:, None] & n_ok[None, :])


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
    pid_k = tl.program_id(1)
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
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)      # [BM, BK]
        # Dequantize the matching W tile in registers: W[offs_n, k0:k0+BK] -> [BN, BK].
        w = nf4_tile(packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
                     offset_ptr, offs_n, k0, N, K, row_bytes, log2_blocksize, BLOCK_K,
                     NESTED_BLOCKSIZE, DOUBLE_QUANT, SCALE_PER_ROW, PAIRED)
        w = cast_to(w, x_ptr.dtype.element_ty, INTERPRET)     # bf16 on the GPU, like the reference
        if INTERPRET:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    first = (pid_k == 0).to(tl.float32)                      # 1 in split 0, else 0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
        acc += first * bias.to(tl.float32)[None, :]
    if HAS_LORA:
        lora = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            xa = tl.load(xa_ptr + offs_m[:, None] * R + offs_r[None, :],
                         mask=m_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            lb = tl.load(lora_b_ptr + offs_n[:, None] * R + offs_r[None, :],
                         mask=n_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            if INTERPRET:
                xa = xa.to(tl.float32)
                lb = lb.to(tl.float32)
            lora = tl.dot(xa, tl.trans(lb), lora, input_precision=DOT_PRECISION)
        acc += (first * lora_scaling) * lora

    y_ptrs = y_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, cast_to(acc, y_ptr.dtype.element_ty, INTERPRET), mask=m_ok[:, None] & n_ok[None, :])
