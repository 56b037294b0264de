"""Which kernel and tile sizes run for a given problem: one deterministic choice per shape.

No autotuning: the configuration is a pure function of (M, N, K, blocksize, dtype, number of
SMs, flags), so a run is reproducible, the Triton interpreter can run it, and every
configuration that can be chosen is listed by `all_plans()` and compiled ahead of time in
the tests.

Forward, Y = X · Wᵀ with X (M, K) and W (N, K):
    M <= 4        nf4_gemv_kernel,   BLOCK_M = 1, 2 or 4, BLOCK_N = 32, split-K to fill the GPU
    4 < M <= 64   nf4_matmul_kernel, BLOCK_M = 16, 32 or 64, BLOCK_N = 64, split-K
    M > 64        nf4_matmul_kernel, 128 x 128 tiles, no split
Backward, dX = dY · W with dY (M, N):
    M <= 64       nf4_matmul_dx_kernel, BLOCK_M = 16, 32 or 64, split over N
    M > 64        nf4_matmul_dx_kernel, 128 x 64 tiles, no split
BLOCK_K is 64: when the blocksize (>= 64) divides K, a K tile never crosses a quantization
block and each row of the tile has one scale (SCALE_PER_ROW); otherwise every element
looks its scale up.
"""
from dataclasses import dataclass, field

import torch

PROGRAMS_PER_SM = 4      # the split heuristics aim for this many programs per SM
INTERPRETER_SMS = 4      # CPU runs pretend to have 4 SMs, so small shapes still split
NESTED_BLOCKSIZE = 256   # double quantization: 256 block scales share one fp32 absmax
BLOCK_K = 64
BLOCK_R = 16             # the LoRA epilogue walks the rank 16 at a time


@dataclass(frozen=True)
class KernelPlan:
    """One launch: kernel name, grid, compile-time constants and launch options."""
    kernel: str                              # "dequant" | "gemv" | "matmul" | "matmul_dx"
    grid: tuple
    constexprs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 2
    split: int = 1                           # split-K / split-N factor (1 = write output directly)
    chunk: int = 0                           # k_per_split (forward) or n_per_split (dX)

    @property
    def config_key(self) -> tuple:
        """What decides the compiled code: kernel, constants and launch options (not the grid)."""
        return (self.kernel, tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages)

    @property
    def tile_key(self) -> tuple:
        """The tile configuration alone (block sizes, warps, stages), without the flags."""
        tiles = tuple(sorted((k, v) for k, v in self.constexprs.items()
                             if k.startswith(("BLOCK", "GROUP"))))
        return (self.kernel, tiles, self.num_warps, self.num_stages)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _quant_constexprs(K: int, blocksize: int, double_quant: bool) -> dict:
    return dict(NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, DOUBLE_QUANT=bool(double_quant),
                SCALE_PER_ROW=(K % blocksize == 0 and blocksize % BLOCK_K == 0),
                PAIRED=(K % 2 == 0))


def _split(programs: int, length: int, block: int, num_sms: int) -> tuple:
    """Cut a reduction of `length` into chunks (multiples of `block`) until the grid has about
    PROGRAMS_PER_SM programs per SM; every chunk keeps at least 4 blocks of work."""
    want = max(1, (PROGRAMS_PER_SM * num_sms) // max(programs, 1))
    most = max(1, length // (4 * block))
    chunk = cdiv(cdiv(length, min(want, most)), block) * block
    return cdiv(length, chunk), chunk


def _dot_precision(dtype: torch.dtype, interpreted: bool) -> str:
    # fp32 operands: exact fp32 products unless PyTorch itself allows TF32 matmuls.
    if dtype == torch.float32 and not interpreted and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def plan_dequant(numel: int, double_quant: bool, interpreted: bool = False) -> KernelPlan:
    """Flat dequantization: 1024 elements (512 bytes) per program."""
    block = 1024
    return KernelPlan("dequant", (cdiv(numel, block),),
                      dict(BLOCK=block, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
                           DOUBLE_QUANT=bool(double_quant), INTERPRET=bool(interpreted)),
                      num_warps=4, num_stages=1)


def plan_matmul(M: int, N: int, K: int, *, blocksize: int, dtype: torch.dtype, double_quant: bool,
                has_bias: bool, has_lora: bool, num_sms: int, interpreted: bool) -> KernelPlan:
    """Forward Y = X · Wᵀ: GEMV path (M <= 4), split-K tile path (M <= 64) or tiled path."""
    const = _quant_constexprs(K, blocksize, double_quant)
    const.update(HAS_BIAS=bool(has_bias), HAS_LORA=bool(has_lora), BLOCK_R=BLOCK_R,
                 INTERPRET=bool(interpreted))
    if M <= 4:
        bm, bn = _next_pow2(M), 32
        n_tiles = cdiv(N, bn)
        split, chunk = _split(n_tiles, K, BLOCK_K, num_sms)
        const.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K)
        return KernelPlan("gemv", (n_tiles, split), const, num_warps=4, num_stages=1,
                          split=split, chunk=chunk)
    fp32 = dtype == torch.float32
    const.update(DOT_PRECISION=_dot_precision(dtype, interpreted))
    if M <= 64:
        bm, bn = max(16, _next_pow2(M)), 64
        tiles = cdiv(M, bm) * cdiv(N, bn)
        split, chunk = _split(tiles, K, BLOCK_K, num_sms)
        const.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, GROUP_M=1)
        return KernelPlan("matmul", (tiles, split), const, num_warps=4,
                          num_stages=2 if fp32 else 3, split=split, chunk=chunk)
    const.update(BLOCK_M=128, BLOCK_N=128, BLOCK_K=BLOCK_K, GROUP_M=8)
    tiles = cdiv(M, 128) * cdiv(N, 128)
    return KernelPlan("matmul", (tiles, 1), const, num_warps=8, num_stages=2 if fp32 else 3,
                      split=1, chunk=cdiv(K, BLOCK_K) * BLOCK_K)


def plan_matmul_dx(M: int, N: int, K: int, *, blocksize: int, dtype: torch.dtype,
                   double_quant: bool, num_sms: int, interpreted: bool) -> KernelPlan:
    """Backward dX = dY · W: BLOCK_K output columns per program, BLOCK_N-row reduction steps."""
    const = _quant_constexprs(K, blocksize, double_quant)
    const.update(INTERPRET=bool(interpreted))
    fp32 = dtype == torch.float32
    const.update(DOT_PRECISION=_dot_precision(dtype, interpreted))
    if M <= 64:
        bm, bn = max(16, _next_pow2(M)), 64
        tiles = cdiv(M, bm) * cdiv(K, BLOCK_K)
        split, chunk = _split(tiles, N, bn, num_sms)
        const.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, GROUP_M=1)
        return KernelPlan("matmul_dx", (tiles, split), const, num_warps=4,
                          num_stages=2 if fp32 else 3, split=split, chunk=chunk)
    const.update(BLOCK_M=128, BLOCK_N=64, BLOCK_K=BLOCK_K, GROUP_M=8)
    tiles = cdiv(M, 128) * cdiv(K, BLOCK_K)
    return KernelPlan("matmul_dx", (tiles, 1), const, num_warps=4 if fp32 else 8,
                      num_stages=2 if fp32 else 3, split=1, chunk=cdiv(N, 64) * 64)


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def all_plans(dtypes=DTYPES, flags: str = "all") -> list:
    """Every configuration the planners can return on a GPU, as (plan, dtype) pairs.

    flags="all":   every combination of the flags too (bias, LoRA, double quant, per-row or
                   per-element scales, even or odd K).
    flags="heavy": per tile configuration, the production flags (everything on, per-row
                   scales, even K) and the worst case (per-element scales, odd K).
    """
    found = {}
    gpu = dict(N=4096, blocksize=64, num_sms=132, interpreted=False)
    # K=4096: blocksize divides K (per-row scales); K=4160+2: even, per-element; 4097: odd K.
    for dt in dtypes:
        for K in (4096, 4162, 4097):
            for dq in (True, False):
                if flags == "heavy" and not dq:
                    continue
                for M in (1, 2, 3, 8, 32, 64, 512):
                    for bias in (False, True):
                        for lora in (False, True):
                            if flags == "heavy" and not (bias and lora):
                                continue
                            p = plan_matmul(M, K=K, dtype=dt, double_quant=dq, has_bias=bias,
                                            has_lora=lora, **gpu)
                            found.setdefault((p.config_key, dt), (p, dt))
                    p = plan_matmul_dx(M, K=K, dtype=dt, double_quant=dq, **gpu)
                    found.setdefault((p.config_key, dt), (p, dt))
                p = plan_dequant(K * 4096, dq)
                found.setdefault((p.config_key, dt), (p, dt))
    plans = list(found.values())
    if flags == "heavy":   # K=4162 (even, per-element scales) only adds nothing new here
        plans = [(p, dt) for p, dt in plans
                 if p.kernel == "dequant" or p.constexprs["SCALE_PER_ROW"] or not p.constexprs["PAIRED"]]
    return plans
