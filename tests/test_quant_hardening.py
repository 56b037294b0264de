"""Bad input to the quantization formats is a clear error naming what is wrong, never a wrong tensor (issue 13)."""
import json

import pytest
import torch

from minilora.quant import (QuantState, dequantize_int8, dequantize_nf4, double_quantize_int8, from_bnb_state_dict,
                            quantize_int8, quantize_nf4, to_bnb_state_dict)

KEY = "w.quant_state.bitsandbytes__nf4"


@pytest.fixture(scope="module")
def saved():
    torch.manual_seed(0)
    state = quantize_nf4(torch.randn(300, 70))  # 329 blocks of 64, 2 nested groups
    return state, to_bnb_state_dict(state, prefix="w")


def with_json(sd, **changes):
    fields = json.loads(bytes(sd[KEY].tolist()).decode())
    for k, v in changes.items():
        if v is None:
            fields.pop(k)
        else:
            fields[k] = v
    return {**sd, KEY: torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)}


def test_a_valid_state_dict_round_trips(saved):
    state, sd = saved
    assert from_bnb_state_dict(sd, prefix="w") == state


@pytest.mark.parametrize("missing", ["w", "w.absmax", "w.quant_map", "w.nested_absmax", "w.nested_quant_map"])
def test_every_missing_entry_is_named(saved, missing):
    sd = {k: v for k, v in saved[1].items() if k != missing}
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        from_bnb_state_dict(sd, prefix="w")


@pytest.mark.parametrize("field", ["quant_type", "blocksize", "dtype", "shape", "nested_offset", "nested_blocksize"])
def test_every_missing_json_field_is_named(saved, field):
    with pytest.raises(ValueError, match=field):
        from_bnb_state_dict(with_json(saved[1], **{field: None}), prefix="w")


@pytest.mark.parametrize("field,value", [
    ("quant_type", "fp4"), ("blocksize", 100), ("blocksize", True), ("blocksize", "64"), ("dtype", "int8"),
    ("shape", [300, -70]), ("shape", [301, 70]), ("shape", "300x70"), ("nested_blocksize", 0),
    ("nested_blocksize", 64), ("nested_offset", None), ("nested_offset", "0.1"), ("nested_dtype", "float16")])
def test_bad_json_fields_are_named(saved, field, value):
    sd = with_json(saved[1], **{field: value}) if value is not None else with_json(saved[1], nested_offset=None)
    with pytest.raises(ValueError, match=field if field != "shape" or value != [301, 70] else r"'w'"):
        from_bnb_state_dict(sd, prefix="w")


def test_a_nested_offset_that_decodes_negative_absmax_is_refused(saved):
    state, sd = saved  # the offset is mean(absmax) >= 0, and every decoded absmax must be >= 0
    smallest = float(from_bnb_state_dict(sd, prefix="w").nested_absmax.min())
    for wrong in (-1.0, float(state.offset) - 4 * smallest, 0.0):
        with pytest.raises(ValueError, match="nested_offset"):
            from_bnb_state_dict(with_json(sd, nested_offset=wrong), prefix="w")


def test_the_json_must_be_an_object_in_utf8(saved):
    sd = saved[1]
    for raw in (b"[1, 2]", b"\xff\xfe", b"{not json"):
        with pytest.raises(ValueError, match="bitsandbytes__nf4"):
            from_bnb_state_dict({**sd, KEY: torch.tensor(list(raw), dtype=torch.uint8)}, prefix="w")
    with pytest.raises(TypeError, match="state_dict"):
        from_bnb_state_dict([("w", sd["w"])], prefix="w")


@pytest.mark.parametrize("key,value,match", [
    ("w.nested_absmax", torch.zeros(0), "nested_absmax"),                        # empty
    ("w.nested_absmax", torch.ones(3), "nested_absmax"),                         # too many groups
    ("w.nested_absmax", torch.tensor([1.0, float("nan")]), "nested_absmax"),     # not finite
    ("w.nested_quant_map", torch.linspace(-1, 1, 16), "nested_quant_map"),       # 16 entries, not 256
    ("w.nested_quant_map", torch.linspace(1, -1, 256), "nested_quant_map"),      # not sorted
    ("w.quant_map", torch.linspace(-1, 1, 15), "quant_map"),
    ("w.absmax", torch.rand(329), "absmax"),                                     # float beside nested_absmax
    ("w.absmax", torch.zeros(328, dtype=torch.uint8), "absmax"),                 # one block short
    ("w", torch.zeros(10, dtype=torch.uint8), "'w'"),                            # codes for another shape
    ("w.absmax", [1, 2, 3], "absmax"),                                           # not a tensor
])
def test_bad_tensors_are_named(saved, key, value, match):
    with pytest.raises(ValueError, match=match):
        from_bnb_state_dict({**saved[1], key: value}, prefix="w")


def test_without_double_quantization(saved):
    state = quantize_nf4(torch.randn(50, 64), double_quant=False)
    sd = to_bnb_state_dict(state, prefix="w")
    assert from_bnb_state_dict(sd, prefix="w") == state
    with pytest.raises(ValueError, match="absmax"):  # uint8 codes with nothing to decode them
        from_bnb_state_dict({**sd, "w.absmax": state.absmax.to(torch.uint8)}, prefix="w")
    with pytest.raises(ValueError, match="nested"):  # a nested tensor without the nested JSON fields
        from_bnb_state_dict({**sd, "w.nested_absmax": torch.ones(1)}, prefix="w")
    with pytest.raises(ValueError, match="absmax"):
        from_bnb_state_dict({**sd, "w.absmax": -state.absmax}, prefix="w")


def test_a_hand_made_or_changed_quant_state_is_checked_before_dequantize():
    s = quantize_nf4(torch.randn(300, 70))
    plain = quantize_nf4(torch.randn(300, 70), double_quant=False)
    bad = [(dict(offset=None), "offset"), (dict(nested_blocksize=0), "nested_blocksize"),
           (dict(double_quant=False), "double_quant"), (dict(blocksize=65), "blocksize"),
           (dict(shape=torch.Size([300, 71])), "packed"), (dict(nested_absmax=s.nested_absmax[:1]), "nested_absmax"),
           (dict(nested_code=None), "nested_code"), (dict(code=s.code[:8]), "code"),
           (dict(absmax=s.absmax.float()), "absmax"), (dict(dtype=torch.int8), "dtype"),
           (dict(packed=s.packed.int()), "packed"), (dict(double_quant=1), "double_quant")]
    for change, name in bad:
        broken = QuantState(**{**vars(s), **change})
        with pytest.raises((ValueError, TypeError), match=name):
            dequantize_nf4(broken)
    with pytest.raises((ValueError, TypeError), match="absmax"):      # double_quant flipped on
        dequantize_nf4(QuantState(**{**vars(plain), "double_quant": True}))
    with pytest.raises((ValueError, TypeError), match="absmax"):
        dequantize_nf4(QuantState(**{**vars(plain), "absmax": plain.absmax[:-1]}))


def test_quant_states_compare_by_value():
    x = torch.randn(100, 64)
    a, b = quantize_nf4(x), quantize_nf4(x.clone())
    assert a == b and not (a != b)
    assert a != quantize_nf4(x + 1)
    assert a != quantize_nf4(x, double_quant=False) and a != quantize_nf4(x.half())
    c = quantize_nf4(x)
    c.offset = c.offset.double()
    assert a != c and a != "a state" and a != None  # noqa: E711
    with pytest.raises(TypeError):
        hash(a)


@pytest.mark.parametrize("value", [3e38, 3.4e38, -3.4028234e38, 1e38])
def test_values_near_the_float32_maximum_quantize(value):
    x = torch.full((128,), value)
    state = quantize_nf4(x)
    assert torch.isfinite(state.offset) and torch.isfinite(state.nested_absmax).all()
    w = dequantize_nf4(state)
    assert torch.isfinite(w).all() and ((w - x).abs() <= abs(value) * 0.01).all()
    mixed = torch.randn(64 * 300)
    mixed[::64] = value  # many huge block maxima: their float32 sum overflows
    w = dequantize_nf4(quantize_nf4(mixed))
    assert torch.isfinite(w).all() and ((w[::64] - value).abs() <= abs(value) * 0.01).all()


def test_double_quantize_int8_of_an_empty_tensor_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        double_quantize_int8(torch.empty(0), 5)


def test_dequantize_int8_needs_the_blocksize_the_codes_were_made_with():
    x = torch.randn(10, 10)
    q, absmax = quantize_int8(x, 5)
    with pytest.raises(ValueError, match="blocksize"):
        dequantize_int8(q, absmax)                 # one block assumed, 20 absmax values given
    with pytest.raises(ValueError, match="blocksize"):
        dequantize_int8(q, absmax, 64)
    assert (dequantize_int8(q, absmax, 5) - x).abs().max() <= absmax.max() / 254 * 1.001
    with pytest.raises(TypeError, match="int8"):
        dequantize_int8(q.float(), absmax, 5)


def test_int8_of_a_block_with_a_tiny_absmax_keeps_its_shape():
    # 127 / absmax overflows float32 for absmax < 3.7e-37: the codes are computed as x / absmax · 127 there
    x = torch.tensor([1e-37, -5e-38, 1e-39, 0.0])
    q, absmax = quantize_int8(x)
    assert q.tolist() == [127, -64, 1, 0]
