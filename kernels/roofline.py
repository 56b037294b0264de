"""The bytes each NF4 matmul must move, and the speed-up over a bf16 matmul the roofline allows.

A kernel can go no faster than its bytes at the memory bandwidth or its multiply-adds at the
peak rate of the units that do them:  t >= max(bytes / bandwidth, flops / peak). With both
sides priced this way, the best ratio an approach can reach against a bf16 torch.matmul is

    ratio = t_bf16 / t_approach        (> 1: faster than bf16)

Bytes moved for Y = X · Wᵀ, X (M, K), W (N, K), 16-bit activations (dX = dY · W moves the
same, with dY (M, N) read and dX (M, K) written):

    bf16           2·N·K + 2·M·K + 2·M·N
    NF4 weight     N·K/2 codes + NB uint8 absmax + 4·ceil(NB/256) fp32 nested absmax
                   + 4·(256 + 16 + 1) tables and offset             (NB = N·K / blocksize)
                   = 0.5159 byte per weight at blocksize 64: at best 2 / 0.5159 = 3.88x bf16
    decode         NF4 weight + activations + 8·split·M·C  (split-K fp32 partials, C = N or K:
                   every split writes its [M, C] slice and the last program reads them all)
    tiles          NF4 weight + activations, + (8·split + 10)·M·C when split (fp32 partials
                   written and read by the sum, the fp32 sum written, read and cast)
    dequant+mm     NF4 weight + 2·N·K (write W in bf16) + 2·N·K (read it) + activations

Multiply-adds (2·M·N·K flops): on the tensor cores for bf16, the tiles, dequant+mm and the
decode kernels' mma path (which pads M to 16 rows); on the CUDA cores (fp32 FMA) for the
decode kernels' multiply-add path. Dequantization instructions are not counted, so every
ratio here is an upper bound; what the GPU does is measured by benchmarks/gpu_check.sh.
Device figures are NVIDIA's datasheet numbers (SXM parts, dense).
"""
from dataclasses import dataclass

from minilora.quant.format import NESTED_BLOCKSIZE

from . import configs

TABLE_BYTES = 4 * (256 + 16 + 1)         # nested_code, the NF4 code, the offset (fp32)


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float         # bytes / s, HBM
    tensor_flops: float      # bf16 dense tensor-core flops / s
    fma_flops: float         # fp32 CUDA-core flops / s (2 per FMA)
    num_sms: int


DEVICES = {
    "A100": Device("A100-SXM4-80GB", 2.039e12, 312e12, 19.5e12, 108),
    "H100": Device("H100-SXM5-80GB", 3.35e12, 989e12, 67e12, 132),
    "H200": Device("H200-SXM-141GB", 4.8e12, 989e12, 67e12, 132),
}


def nf4_weight_bytes(N: int, K: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of an NF4 weight (N, K): codes, block scales, tables."""
    numel = N * K
    nb = configs.cdiv(numel, blocksize)
    if double_quant:
        return configs.cdiv(numel, 2) + nb + 4 * configs.cdiv(nb, NESTED_BLOCKSIZE) + TABLE_BYTES
    return configs.cdiv(numel, 2) + 4 * nb + 4 * 16


def _plan(approach: str, pass_: str, M: int, N: int, K: int, device: Device, blocksize: int):
    import torch
    kw = dict(blocksize=blocksize, dtype=torch.bfloat16, double_quant=True, num_sms=device.num_sms,
              interpreted=False)
    if approach == "decode":
        if pass_ == "fwd":
            return configs.plan_gemv(M, N, K, has_bias=False, has_lora=False, **kw)
        return configs.plan_gemv_dx(M, N, K, **kw)
    if pass_ == "fwd":
        return configs.plan_matmul(M, N, K, has_bias=False, has_lora=False, **kw)
    return configs.plan_matmul_dx(M, N, K, **kw)


def bytes_moved(approach: str, pass_: str, M: int, N: int, K: int, device: Device,
                blocksize: int = 64) -> int:
    """Bytes `approach` ("bf16", "decode", "tiles", "dequant+mm") moves for one pass ("fwd" or
    "dX") with the split its planner picks on `device`."""
    act = 2 * M * K + 2 * M * N
    if approach == "bf16":
        return 2 * N * K + act
    w = nf4_weight_bytes(N, K, blocksize)
    if approach == "dequant+mm":
        return w + 4 * N * K + act
    plan = _plan(approach, pass_, M, N, K, device, blocksize)
    cols = N if pass_ == "fwd" else K
    if plan.split == 1:
        return w + act
    return w + act + 8 * plan.split * M * cols + (0 if approach == "decode" else 10 * M * cols)


def flops_time(approach: str, pass_: str, M: int, N: int, K: int, device: Device) -> float:
    """Seconds the multiply-adds take at the peak rate of the units that do them."""
    if approach == "decode":
        plan = _plan(approach, pass_, M, N, K, device, 64)
        if not plan.constexprs["USE_DOT"]:
            return 2 * M * N * K / device.fma_flops
        return 2 * configs.cdiv(M, 16) * 16 * N * K / device.tensor_flops
    return 2 * M * N * K / device.tensor_flops


def roofline_time(approach: str, pass_: str, M: int, N: int, K: int, device: Device) -> float:
    return max(bytes_moved(approach, pass_, M, N, K, device) / device.bandwidth,
               flops_time(approach, pass_, M, N, K, device))


def predicted_ratio(approach: str, pass_: str, M: int, N: int, K: int, device: Device) -> float:
    """The best speed-up over a bf16 torch.matmul `approach` can reach: t_bf16 / t_approach."""
    return roofline_time("bf16", pass_, M, N, K, device) / roofline_time(approach, pass_, M, N, K, device)


def describe(approach: str, pass_: str, M: int, N: int, K: int, device: Device) -> str:
    """Which configuration the approach runs: decode path (fma/mma) and split, or tiles."""
    if approach not in ("decode", "tiles"):
        return approach
    p = _plan(approach, pass_, M, N, K, device, 64)
    c = p.constexprs
    if approach == "decode":
        return f"decode {'mma' if c['USE_DOT'] else 'fma'} BM{c['BLOCK_M']} split{p.split}"
    return f"tiles {c['BLOCK_M']}x{c['BLOCK_N']} split{p.split}"
