"""The bytes-moved model (kernels/roofline.py) against values worked out by hand."""
import pytest

from minilora.kernels import roofline

H100 = roofline.DEVICES["H100"]


def test_nf4_weight_is_0516_bytes_per_weight():
    # 4096 x 4096: 8388608 bytes of codes, 262144 uint8 scales, 1024 fp32 nested scales, tables.
    assert roofline.nf4_weight_bytes(4096, 4096) == 8388608 + 262144 + 4096 + 1092
    per_weight = roofline.nf4_weight_bytes(4096, 4096) / 4096**2
    assert per_weight == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-4)
    assert 2 / per_weight == pytest.approx(3.877, abs=2e-3)
    assert roofline.nf4_weight_bytes(64, 64, double_quant=False) == 2048 + 4 * 64 + 64


def test_decode_bytes_and_ratio_by_hand():
    # M = 1 forward on an H100: 512 row tiles of 8, split 2 (8 programs/SM on 132 SMs).
    assert roofline.describe("decode", "fwd", 1, 4096, 4096, H100) == "decode fma BM1 split2"
    assert roofline.describe("decode", "fwd", 3, 4096, 4096, H100).startswith("decode mma BM16")
    nf4 = 8655940 + 2 * 4096 + 2 * 4096 + 8 * 2 * 1 * 4096          # weight, X, Y, partials
    assert roofline.bytes_moved("decode", "fwd", 1, 4096, 4096, H100) == nf4 == 8737860
    bf16 = 2 * 4096 * 4096 + 2 * 4096 + 2 * 4096
    assert roofline.bytes_moved("bf16", "fwd", 1, 4096, 4096, H100) == bf16 == 33570816
    # memory-bound on both sides: the ratio is the byte ratio
    assert roofline.predicted_ratio("decode", "fwd", 1, 4096, 4096, H100) == pytest.approx(33570816 / 8737860)
    # dX at M = 16: mma path, split 4 (capped by the 25 % partial budget: 4 * 8 * 16 <= 0.25 * 0.5 * 4096)
    assert roofline.describe("decode", "dX", 16, 4096, 4096, H100) == "decode mma BM16 split4"
    assert roofline.bytes_moved("decode", "dX", 16, 4096, 4096, H100) == 8655940 + 2 * 16 * 8192 + 8 * 4 * 16 * 4096


def test_compute_bound_shapes_by_hand():
    # M = 4096 on 4096 x 4096: 2 * 4096**3 flops = 139 us at 989 TFLOP/s, far above the bytes
    # (tens of MB at 3.35 TB/s): both sides compute-bound, ratio 1.
    assert roofline.predicted_ratio("tiles", "fwd", 4096, 4096, 4096, H100) == pytest.approx(1.0)
    t = roofline.roofline_time("bf16", "fwd", 4096, 4096, 4096, H100)
    assert t == pytest.approx(2 * 4096**3 / 989e12)
    # dequantize-then-matmul at M = 1 moves 0.516 + 4 bytes per weight: 33570816 / (8655940 + 4*4096**2 + 16384)
    assert roofline.predicted_ratio("dequant+mm", "fwd", 1, 4096, 4096, H100) == pytest.approx(
        33570816 / (8655940 + 4 * 4096**2 + 16384))
    # On an A100 the FMA path at M = 2 takes 2*2*4096*4096 / 19.5e12 = 3.4 us of multiply-adds, under
    # the 8.7 MB / 2.039e12 = 4.3 us of bytes; from M = 3 the mma path pads M to 16 rows at 312 TFLOP/s.
    a100 = roofline.DEVICES["A100"]
    assert roofline.flops_time("decode", "fwd", 2, 4096, 4096, a100) == pytest.approx(2 * 2 * 4096**2 / 19.5e12)
    assert roofline.roofline_time("decode", "fwd", 2, 4096, 4096, a100) == pytest.approx(
        roofline.bytes_moved("decode", "fwd", 2, 4096, 4096, a100) / 2.039e12)
    assert roofline.flops_time("decode", "fwd", 4, 4096, 4096, a100) == pytest.approx(2 * 16 * 4096**2 / 312e12)
