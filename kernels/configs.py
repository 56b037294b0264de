"""Which kernel and tile sizes run for a given problem: one deterministic choice per shape.

No autotuning: the configuration is a pure function of (M, N, K, blocksize, dtype, number of SMs, flags),
so a run is reproducible, the interpreter can run it, and `all_plans()` lists every choice for the AOT tests.

Decode kernels (nf4_gemv.py), M <= 16 and K % 8 == 0 (plan_gemv, plan_gemv_dx):
    M <= 2        fp32 multiply-adds, 8 rows of W per program (fp32 operands: any M <= 16)
    3 <= M <= 16  one 16-row mma tile, 16 rows (forward) / 32-row steps (dX) of W per program
    forward       256 columns (128 bytes of codes) per step; dX: 64-column tiles
    split-K       about 8 programs per SM, partial sums within 25 % of the weight's bytes
Forward, Y = X · Wᵀ with X (M, K) and W (N, K), nf4_matmul_kernel (the tile kernels):
    M <= 64       BLOCK_M = 16, 32 or 64, BLOCK_N = 128, split-K to fill the GPU
    M > 64        128 x 128 tiles, 4 warps (8 with the LoRA epilogue or below sm_90), 3 stages
Backward, dX = dY · W with dY (M, N), nf4_matmul_dx_kernel:
    M <= 64       BLOCK_M = 16, 32 or 64, 128-row reduction steps, split over N
    M > 64        128 x 64 tiles, 4 warps, 3 stages, no split
These are for bf16/fp16 with even K and blocksize | K; fp32 and the per-element path (odd K, or blocks
that cross rows) use narrower tiles and fewer stages (see _tiles). The tile kernels' sizes were picked by
timing candidates on an H100 (bf16, 4096 x 4096 and 11008 x 4096 weights); the decode kernels' by registers
(ptxas, no spills) and the roofline model (roofline.py), to be checked by benchmarks/gpu_check.sh.
BLOCK_K is 64: when the blocksize (>= 64) divides K, a K tile never crosses a quantization block and each
row of the tile has one scale (SCALE_PER_ROW); otherwise every element looks its scale up.
"""
from dataclasses import dataclass, field

import torch

from minilora.quant.format import NESTED_BLOCKSIZE  # double quantization: 256 block scales share one fp32 absmax

PROGRAMS_PER_SM = 2      # the split heuristics aim for this many programs per SM
INTERPRETER_SMS = 4      # CPU runs pretend to have 4 SMs, so small shapes still split
BLOCK_K = 64
BLOCK_R = 16             # the LoRA epilogue walks the rank 16 at a time
DECODE_MAX_M = 16        # the decode kernels (nf4_gemv.py) take M <= 16 rows ...
DECODE_DOT_MIN_M = 3     # ... on the tensor cores from 3 rows (16-bit), multiply-adds on the CUDA cores below:
                         # at 4 rows an A100 would be bound by its fp32 FMA rate (kernels/roofline.py)
DECODE_BLOCK_K = 256     # forward: 32 words of eight codes, one 128-byte line per row of a W tile
DECODE_DX_BLOCK_K = 64   # dX: 8 words (one 32-byte sector) per row and 32 rows per step, so that K
                         # gives 4x more column tiles (programs) than 256 would
DECODE_PROGRAMS_PER_SM = 8   # streaming wants many loads in flight: 8 programs of 4 warps per SM
DECODE_PARTIAL_BUDGET = 0.25  # split-K partials (fp32, written and read) may add 25 % to the bytes of W


@dataclass(frozen=True)
class KernelPlan:
    """One launch: kernel name, grid, compile-time constants and launch options."""
    kernel: str                              # "dequant" | "matmul" | "matmul_dx"
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
    """fp32 operands on the GPU: three TF32 products per multiply ("tf32x3", close to fp32 and
    on the tensor cores; plain "ieee" fp32 falls back to FMAs and spills registers), or one
    TF32 product when PyTorch itself allows TF32 matmuls. 16-bit operands ignore it."""
    if dtype != torch.float32 or interpreted:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def plan_dequant(numel: int, double_quant: bool, interpreted: bool = False) -> KernelPlan:
    """Flat dequantization: 1024 elements (512 bytes) per program."""
    block = 1024
    return KernelPlan("dequant", (cdiv(numel, block),),
                      dict(BLOCK=block, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
                           DOUBLE_QUANT=bool(double_quant), INTERPRET=bool(interpreted)),
                      num_warps=4, num_stages=1)


def _tiles(small: bool, M: int, fast: bool, fp32: bool, large_tuned: tuple) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). The tuned tiles need the fast dequantization
    path (even K, one scale per row) and 16-bit operands; fp32 (three TF32 products per
    multiply) and the per-element path use 32-wide tiles (32 rows at most for the per-element
    path), 8 warps (4 for fp32 tiles of up to 32 rows: ptxas then keeps all registers) and
    fewer stages, so that no configuration spills (tests/test_kernels_aot.py checks)."""
    if fast and not fp32:
        return (max(16, _next_pow2(M)), 128, 4, 3) if small else large_tuned
    bm = max(16, _next_pow2(M)) if small else 64
    if not fast:
        bm = min(bm, 32)
    return (bm, 32, 4 if (fp32 and bm <= 32) else 8, 2 if fast else 1)


def _tiled_plan(kind: str, const: dict, small: bool, tiles: int, length: int, step: int, num_sms: int,
                tiling: tuple) -> KernelPlan:
    """A matmul plan: `tiles` output tiles; the reduction of `length` in steps of `step` is split over
    programs for small M (split-K), done by one program per tile otherwise."""
    bm, bn, warps, stages = tiling
    if small:
        split, chunk = _split(tiles, length, step, num_sms)
    else:
        split, chunk = 1, cdiv(length, step) * step
    const.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, GROUP_M=1 if small else 8)
    return KernelPlan(kind, (tiles, split), const, num_warps=warps, num_stages=stages, split=split, chunk=chunk)


def plan_matmul(M: int, N: int, K: int, *, blocksize: int, dtype: torch.dtype, double_quant: bool,
                has_bias: bool, has_lora: bool, num_sms: int, interpreted: bool,
                capability: int = 90) -> KernelPlan:
    """Forward Y = X · Wᵀ: split-K tiles for M <= 64, 128 x 128 tiles above."""
    const = _quant_constexprs(K, blocksize, double_quant)
    const.update(HAS_BIAS=bool(has_bias), HAS_LORA=bool(has_lora), BLOCK_R=BLOCK_R,
                 INTERPRET=bool(interpreted), DOT_PRECISION=_dot_precision(dtype, interpreted))
    fast = const["PAIRED"] and const["SCALE_PER_ROW"]
    small = M <= 64
    # 128 x 128 with 4 warps is the fastest large-M tile measured on an H100 (sm_90), but it
    # spills registers with the LoRA epilogue, and on sm_80 (operands in registers for mma)
    # always: 8 warps then (1.6-1.9x slower on an H100 without LoRA, no spills).
    warps = 4 if capability >= 90 and not has_lora else 8
    bm, bn, warps, stages = _tiles(small, M, fast, dtype == torch.float32, (128, 128, warps, 3))
    return _tiled_plan("matmul", const, small, cdiv(M, bm) * cdiv(N, bn), K, BLOCK_K, num_sms,
                       (bm, bn, warps, stages))


def plan_matmul_dx(M: int, N: int, K: int, *, blocksize: int, dtype: torch.dtype,
                   double_quant: bool, num_sms: int, interpreted: bool,
                   capability: int = 90) -> KernelPlan:
    """Backward dX = dY · W: BLOCK_K output columns per program, BLOCK_N-row reduction steps."""
    const = _quant_constexprs(K, blocksize, double_quant)
    const.update(INTERPRET=bool(interpreted), DOT_PRECISION=_dot_precision(dtype, interpreted))
    fast = const["PAIRED"] and const["SCALE_PER_ROW"]
    small = M <= 64
    bm, bn, warps, stages = _tiles(small, M, fast, dtype == torch.float32, (128, 64, 4, 3))
    return _tiled_plan("matmul_dx", const, small, cdiv(M, bm) * cdiv(K, BLOCK_K), N, bn, num_sms,
                       (bm, bn, warps, stages))


def decode_supported(M: int, K: int) -> bool:
    """Can the decode kernels take this problem? M <= 16 rows and K a multiple of 8 (rows of
    W start on a 32-bit word)."""
    return 1 <= M <= DECODE_MAX_M and K % 8 == 0


def _decode_tiles(M: int, dtype: torch.dtype) -> tuple:
    """(BLOCK_M, USE_DOT, BLOCK_N, num_warps, num_stages) of a decode plan's forward.

    16-bit operands from DECODE_DOT_MIN_M rows: one 16-row mma tile on the tensor cores, 16 rows
    of W per program, 2 stages. Otherwise fp32 multiply-adds on 8 rows of W per program, exact
    fp32 (fp32 operands at any M: three TF32 products per multiply spilled registers at these
    tiles), one row of X at a time; the loads feed no tl.dot, so there is nothing to pipeline
    (1 stage). ptxas, sm_80 and sm_90 (benchmarks/kernel_report.py --kernels decode): forward
    56-96 registers on the multiply-add path and 140-168 on the mma tile, dX 63-142; no spills."""
    if dtype != torch.float32 and M >= DECODE_DOT_MIN_M:
        return 16, True, 16, 4, 2
    return _next_pow2(M), False, 8, 4, 1


def _decode_plan(kind: str, M: int, K: int, *, blocksize: int, dtype: torch.dtype, double_quant: bool,
                 num_sms: int, interpreted: bool, tiles, length: int, step, const: dict) -> KernelPlan:
    """One decode launch: `tiles(BLOCK_N)` output tiles, each reducing over `length` in steps of
    `step(BLOCK_N)`, split so that about DECODE_PROGRAMS_PER_SM programs per SM stream W. Every
    slice is at least two steps long, and the fp32 partial sums (8 bytes per split and output
    element, M per column of W) stay within DECODE_PARTIAL_BUDGET of its 0.5 byte per weight:
    split · 8 · M <= budget · 0.5 · length."""
    if not decode_supported(M, K):
        raise ValueError(f"the decode kernels need 1 <= M <= {DECODE_MAX_M} and K % 8 == 0, got M={M}, K={K}")
    bm, use_dot, bn, warps, stages = _decode_tiles(M, dtype)
    block_k = DECODE_BLOCK_K
    if kind == "gemv_dx":
        block_k, bn = DECODE_DX_BLOCK_K, 32
    n_tiles, step = tiles(bn), step(bn)
    want = max(1, (DECODE_PROGRAMS_PER_SM * num_sms) // n_tiles)
    want = min(want, max(1, int(DECODE_PARTIAL_BUDGET * 0.5 * length / (8 * M))))
    chunk = cdiv(cdiv(length, min(want, max(1, length // (2 * step)))), step) * step
    split = cdiv(length, chunk)
    const.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, USE_DOT=use_dot, SPLIT=split > 1,
                 GROUP=min(blocksize, block_k) if K % blocksize == 0 else 8,
                 NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, DOUBLE_QUANT=bool(double_quant),
                 INTERPRET=bool(interpreted),
                 DOT_PRECISION=_dot_precision(dtype, interpreted) if use_dot else "ieee")
    return KernelPlan(kind, (n_tiles, split), const, num_warps=warps, num_stages=stages, split=split,
                      chunk=chunk)


def plan_gemv(M: int, N: int, K: int, *, blocksize: int, dtype: torch.dtype, double_quant: bool,
              has_bias: bool, has_lora: bool, num_sms: int, interpreted: bool) -> KernelPlan:
    """Decode forward (nf4_gemv_kernel): BLOCK_N rows of W per program, K split in BLOCK_K steps."""
    return _decode_plan("gemv", M, K, blocksize=blocksize, dtype=dtype, double_quant=double_quant,
                        num_sms=num_sms, interpreted=interpreted,
                        tiles=lambda bn: cdiv(N, bn), length=K, step=lambda bn: DECODE_BLOCK_K,
                        const=dict(HAS_BIAS=bool(has_bias), HAS_LORA=bool(has_lora), BLOCK_R=BLOCK_R))


def plan_gemv_dx(M: int, N: int, K: int, *, blocksize: int, dtype: torch.dtype, double_quant: bool,
                 num_sms: int, interpreted: bool) -> KernelPlan:
    """Decode dX (nf4_gemv_dx_kernel): DECODE_DX_BLOCK_K columns of W per program, N split in
    BLOCK_N = 32 row steps."""
    return _decode_plan("gemv_dx", M, K, blocksize=blocksize, dtype=dtype, double_quant=double_quant,
                        num_sms=num_sms, interpreted=interpreted,
                        tiles=lambda bn: cdiv(K, DECODE_DX_BLOCK_K), length=N, step=lambda bn: bn, const={})


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def all_plans(dtypes=DTYPES, flags: str = "all", capability: int = 90) -> list:
    """Every configuration the planners can return on a GPU of `capability` (80: A100,
    90: H100), as (plan, dtype) pairs.

    flags="all":   every combination of the flags too (bias, LoRA, double quant, per-row or
                   per-element scales, even or odd K).
    flags="heavy": per tile configuration, the production flags (double quant and bias on,
                   LoRA epilogue on and off, per-row scales, even K) and the worst case
                   (per-element scales, odd K).
    """
    found = {}
    gpu = dict(N=4096, blocksize=64, num_sms=132, interpreted=False, capability=capability)
    # K=4096: blocksize divides K (per-row scales); K=4160+2: even, per-element; 4097: odd K.
    for dt in dtypes:
        for K in (4096, 4162, 4097):
            for dq in (True, False):
                if flags == "heavy" and not dq:
                    continue
                for M in (1, 32, 64, 512):
                    for bias in (False, True):
                        for lora in (False, True):
                            if flags == "heavy" and not bias:
                                continue
                            p = plan_matmul(M, K=K, dtype=dt, double_quant=dq, has_bias=bias,
                                            has_lora=lora, **gpu)
                            found.setdefault((p.config_key, dt), (p, dt))
                    p = plan_matmul_dx(M, K=K, dtype=dt, double_quant=dq, **gpu)
                    found.setdefault((p.config_key, dt), (p, dt))
                p = plan_dequant(K * 4096, dq)
                found.setdefault((p.config_key, dt), (p, dt))
    for p, dt in decode_plans(dtypes, flags):
        found.setdefault((p.config_key, dt), (p, dt))
    plans = list(found.values())
    if flags == "heavy":   # K=4162 (even, per-element scales) only adds nothing new here
        plans = [(p, dt) for p, dt in plans
                 if p.kernel.startswith(("dequant", "gemv")) or p.constexprs["SCALE_PER_ROW"]
                 or not p.constexprs["PAIRED"]]
    return plans


def decode_plans(dtypes=DTYPES, flags: str = "all") -> list:
    """Every configuration the decode planners can return on a GPU, as (plan, dtype) pairs:
    each row count's tiles (M = 1, 2, 3-4, 5-8, 9-16), split-K on (4096 x 4096) and, in the
    forward, off (28672 rows), scales per block (K = 4096, blocksize 32, 64, 128), per tile
    (blocksize 1024) and per word (K = 4104: blocks cross rows), with and without double
    quantization, bias and LoRA.
    flags="heavy": split-K on, double quantization, bias on, LoRA on and off, per-block and
    per-word scales (the configurations with the most code)."""
    found = {}
    heavy = flags == "heavy"
    for dt in dtypes:
        for M in (1, 2, 4, 8, 16):
            for N, K, bs in ((4096, 4096, 64), (4096, 4104, 64), (4096, 4096, 1024), (28672, 4096, 64),
                             (4096, 4096, 32), (4096, 4096, 128)):
                if heavy and (bs != 64 or N != 4096):
                    continue
                for dq in (True,) if heavy else (True, False):
                    for bias, lora in ((True, False), (True, True)) if heavy else \
                            ((False, False), (True, False), (False, True), (True, True)):
                        p = plan_gemv(M, N, K, blocksize=bs, dtype=dt, double_quant=dq, has_bias=bias,
                                      has_lora=lora, num_sms=132, interpreted=False)
                        found.setdefault((p.config_key, dt), (p, dt))
                    p = plan_gemv_dx(M, N, K, blocksize=bs, dtype=dt, double_quant=dq, num_sms=132,
                                     interpreted=False)
                    found.setdefault((p.config_key, dt), (p, dt))
    return list(found.values())
