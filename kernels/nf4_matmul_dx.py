"""Fused NF4 dequant-matmul, backward input gradient:  dX = dY · W.

dY: (M, N), W: (N, K) NF4, dX: (M, K). Each program owns a [BLOCK_M, BLOCK_K] tile of dX
and loops over the N (reduction) axis in BLOCK_N steps: it loads a [BLOCK_M, BLOCK_N] tile of
dY and dequantizes the [BLOCK_N, BLOCK_K] tile of W at rows n0..n0+BLOCK_N, columns of its
own output tile, in registers (`nf4_tile`), then accumulates tl.dot(dY, W) in fp32. Here W is
used untransposed, so each W tile is BLOCK_N row pieces of BLOCK_K // 2 contiguous bytes.

For small M, split-N (grid axis 1) gives each program a slice of the reduction and writes
fp32 partial sums to a (SPLIT, M, K) buffer the caller adds up. INTERPRET: see nf4_matmul.py.
"""
import triton
import triton.language as tl

from .cast import cast_to
from .nf4_tile import nf4_tile


@triton.jit
def nf4_matmul_dx_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr,
                         nested_absmax_ptr, offset_ptr, dx_ptr,
                         M, N, K, row_bytes, log2_blocksize, n_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr,
                         NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                         SCALE_PER_ROW: tl.constexpr, PAIRED: tl.constexpr,
                         INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)                                  # which slice of N (split)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_k = (K + BLOCK_K - 1) // BLOCK_K
    per_group = GROUP_M * num_k
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_k = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K                                      # this program's dX columns
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)

    code = tl.load(code_ptr + tl.arange(0, 16))               # the NF4 table, in registers
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :],
                     mask=m_ok[:, None] & (offs_n[None, :] < N), other=0.0)    # [BM, BN]
        # W[n0:n0+BN, k0:k0+BK], dequantized in registers -> [BN, BK]
        w = nf4_tile(packed_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                     offset_ptr, code, offs_n, k0, N, K, row_bytes, log2_blocksize, BLOCK_K,
                     NESTED_BLOCKSIZE, DOUBLE_QUANT, SCALE_PER_ROW, PAIRED)
        w = cast_to(w, dy_ptr.dtype.element_ty, INTERPRET)
        if INTERPRET:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)

    dx_ptrs = dx_ptr + pid_s * M * K + offs_m[:, None] * K + offs_k[None, :]
    tl.store(dx_ptrs, cast_to(acc, dx_ptr.dtype.element_ty, INTERPRET), mask=m_ok[:, None] & (offs_k[None, :] < K))
