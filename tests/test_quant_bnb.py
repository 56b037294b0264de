"""Byte-for-byte agreement with bitsandbytes (CPU) and the saved-weight interchange, both ways."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), e=st.integers(-45, 0), blocks=st.integers(1, 700), blocksize=st.sampled_from([32, 64, 256]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_every_finite_input_quantizes_equal_to_bitsandbytes_where_it_is_finite(seed, e, blocks, blocksize, dtype):
    # magnitudes from subnormal to the dtype's maximum: bitsandbytes' float32 mean of the block maxima overflows for
    # the largest ones (its offset and nested absmax become inf, its output NaN); ours stays finite there
    g = torch.Generator().manual_seed(seed)
    top = torch.finfo(dtype).max
    x = (torch.randn(blocks * blocksize - seed % blocksize, generator=g) * (top * 10.0 ** e / 4)).clamp(-top, top)
    x = x.to(dtype)
    ours = quantize_nf4(x, blocksize=blocksize)
    assert torch.isfinite(ours.offset) and torch.isfinite(ours.nested_absmax).all()
    packed, ref = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    if torch.isfinite(ref.offset) and torch.isfinite(ref.state2.absmax).all():
        assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, ref.absmax)
        assert torch.equal(ours.offset, ref.offset) and torch.equal(ours.nested_absmax, ref.state2.absmax)
        theirs = F.dequantize_4bit(packed, ref).reshape(x.shape)
        assert torch.equal(dequantize_nf4(ours), theirs)
    else:
        assert float(x.float().abs().max()) > 1e36  # only where the float32 sum of block maxima overflows


@pytest.mark.parametrize("c", [1e-37, 5e-39, 2.9e-39, 1e-40, 1e-45])
def test_nested_8bit_codes_of_tiny_groups_equal_bitsandbytes(c):
    # 1/c has no floor in bitsandbytes' 8-bit rule: inf below 2.9e-39, where y · inf clamps to ±1 and 0 · inf -> 0
    from minilora.quant import dynamic_code
    from minilora.quant.blockwise8bit import quantize_groups as quantize_blockwise_8bit
    y = torch.tensor([-c, 0.0, c / 2, c, c / 3, -c / 7] + [0.0] * 250 + [c, -c / 2])
    q, state = F.quantize_blockwise(y, code=dynamic_code(), blocksize=256)
    ours, c2 = quantize_blockwise_8bit(y, dynamic_code(), 256)
    assert torch.equal(ours, q) and torch.equal(c2, state.absmax)


@pytest.mark.parametrize("n", [31, 100, 64 * 5 + 1])
def test_an_all_zero_ragged_block_equals_bitsandbytes(n):
    x = torch.zeros(n)  # bitsandbytes stores max(absmax, 1e-38) for a ragged last block
    packed, ref = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = quantize_nf4(x)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, ref.absmax)
    assert torch.equal(ours.offset, ref.offset) and torch.equal(ours.nested_absmax, ref.state2.absmax)
    assert torch.equal(dequantize_nf4(ours), F.dequantize_4bit(packed, ref).reshape(n))
