"""Byte-for-byte agreement with bitsandbytes (CPU) and the saved-weight interchange, both ways."""
import pytest
import torch

F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed: no reference to compare")
from bitsandbytes.functional import QuantState as BnbQuantState  # noqa: E402

from minilora.quant import (dequantize_nf4, from_bnb_state_dict, quantize_nf4, to_bnb_state_dict,  # noqa: E402
                            quantize_4bit, fp4_code)



@pytest.fixture(autouse=True, scope="module")
def _eager_bitsandbytes():
    """bitsandbytes wraps its PyTorch fallbacks in torch.compile; eager is the same arithmetic, and fast."""
    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous


CASES = [  # (shape, blocksize): multiples of the blocksize and not, odd element counts, several nested groups
    ((256, 256), 64), ((7, 3), 64), ((1,), 64), ((1001,), 64), ((33, 66), 32), ((3, 5, 129), 128),
    ((300, 256), 64), ((130, 200), 256), ((64 * 600,), 64), ((4096, 130), 4096),
]


def _data(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3
    flat = x.view(-1)
    if flat.numel() > 10:
        flat[3] = -40.0  # outliers
        flat[-2] = 25.0
        flat[5:5 + min(64, flat.numel() - 7)] = 0.0  # an all-zero stretch
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize", CASES)
def test_nf4_double_quant_bytes_equal_bitsandbytes(shape, blocksize, dtype):
    x = _data(shape, dtype, seed=len(shape) * 1000 + blocksize)
    packed, ref = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    ours = quantize_nf4(x, blocksize=blocksize, double_quant=True)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, ref.absmax)                  # uint8 codes of absmax - offset
    assert torch.equal(ours.offset, ref.offset)
    assert torch.equal(ours.nested_absmax, ref.state2.absmax)
    assert torch.equal(ours.nested_code, ref.state2.code)
    theirs = F.dequantize_4bit(packed, ref)
    assert torch.equal(dequantize_nf4(ours), theirs.reshape(shape))  # bnb returns (1, n) for 1-D input
    assert theirs.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_without_double_quant_equals_bitsandbytes(dtype):
    x = _data((190, 77), dtype, seed=7)
    packed, ref = F.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = quantize_nf4(x, blocksize=64, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, ref.absmax)
    assert torch.equal(dequantize_nf4(ours), F.dequantize_4bit(packed, ref))


def test_export_matches_bitsandbytes_serialisation_exactly():
    x = _data((96, 80), torch.bfloat16, seed=3)
    packed, ref = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = to_bnb_state_dict(quantize_nf4(x), prefix="weight")
    expected = {"weight": packed, **{f"weight.{k}": v for k, v in ref.as_dict(packed=True).items()}}
    assert set(ours) == set(expected)
    for key, value in expected.items():  # includes the JSON-in-uint8 tensor, byte for byte
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_through_bitsandbytes_quant_state(double_quant):
    # (bitsandbytes 0.50's CPU dequantize_4bit mis-indexes absmax for some shapes whose last dimension is
    # not a multiple of the blocksize, e.g. (64, 48) with blocksize 32, so a clean shape is used here.)
    x = _data((64, 64), torch.float16, seed=4)
    state = quantize_nf4(x, blocksize=32, double_quant=double_quant)
    sd = to_bnb_state_dict(state, prefix="lin.weight")
    # ours -> bitsandbytes: its QuantState.from_dict reads our entries, its dequantize gives our tensor
    qs = BnbQuantState.from_dict({k[len("lin.weight."):]: v for k, v in sd.items() if k != "lin.weight"},
                                 device=torch.device("cpu"))
    assert qs.nested == double_quant and qs.blocksize == 32 and qs.dtype == torch.float16
    assert torch.equal(F.dequantize_4bit(sd["lin.weight"], qs), dequantize_nf4(state))
    # bitsandbytes -> ours: its as_dict(packed=True) entries load back into an identical state
    back = from_bnb_state_dict({"lin.weight": sd["lin.weight"],
                                **{f"lin.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}},
                               prefix="lin.weight")
    assert back.double_quant == double_quant and back.shape == x.shape and back.dtype == x.dtype
    assert torch.equal(back.packed, state.packed) and torch.equal(back.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(state))


def test_import_errors_are_clear():
    with pytest.raises(ValueError, match="bitsandbytes__nf4"):
        from_bnb_state_dict({"weight": torch.zeros(2, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="NF4"):
        to_bnb_state_dict(quantize_4bit(torch.randn(64), fp4_code()))
