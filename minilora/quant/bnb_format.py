"""Saved 4-bit weights in the layout bitsandbytes and Hugging Face checkpoints use (no bitsandbytes needed).

A Linear4bit weight under `prefix` is stored as these state-dict entries:

    prefix                                  uint8 (bytes, 1): packed codes, first element in the high nibble
    prefix.absmax                           uint8 codes (double quant) or float32 block absmax
    prefix.quant_map                        float32 (16,): the 4-bit codebook
    prefix.nested_absmax                    float32 (groups,)   } double quantization only
    prefix.nested_quant_map                 float32 (256,)      }
    prefix.quant_state.bitsandbytes__nf4    uint8: UTF-8 bytes of a JSON object holding the non-tensor fields
                                            quant_type, blocksize, dtype, shape, and with double quantization
                                            nested_blocksize, nested_dtype, nested_offset
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from .codebooks import check_code, nf4_code
from .format import DTYPE_NAMES, FLOAT_DTYPES, is_blocksize
from .nf4 import dequantize_absmax
from .quant_state import QuantState, check_state

_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_NESTED_FIELDS = ("nested_blocksize", "nested_offset")
G8 = 0.9 / 64  # largest gap of the dynamic 8-bit map (codebooks.dynamic_code)


def _pack_json(fields: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)


def to_bnb_state_dict(state: QuantState, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' Linear4bit saves for this NF4 weight (see module docstring)."""
    check_state(state)
    if not torch.equal(state.code.float().cpu(), nf4_code()):
        raise ValueError("only the NF4 codebook has a bitsandbytes name; this state uses another code")
    fields = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": DTYPE_NAMES[state.dtype],
              "shape": list(state.shape)}
    out = {prefix: state.packed.reshape(-1, 1), f"{prefix}.absmax": state.absmax,
           f"{prefix}.quant_map": state.code.float()}
    if state.double_quant:
        out[f"{prefix}.nested_absmax"] = state.nested_absmax
        out[f"{prefix}.nested_quant_map"] = state.nested_code.clone()
        fields.update(nested_blocksize=state.nested_blocksize, nested_dtype="float32",
                      nested_offset=float(state.offset))
    out[f"{prefix}.quant_state.bitsandbytes__nf4"] = _pack_json(fields)
    return out


def _json_fields(state_dict: Mapping, key: str) -> dict:
    """The JSON object stored as UTF-8 bytes in state_dict[key], its fields checked."""
    t = state_dict[key]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise ValueError(f"{key!r} must be a uint8 tensor of UTF-8 JSON bytes, got {getattr(t, 'dtype', type(t))}")
    try:
        fields = json.loads(bytes(t.reshape(-1).cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key!r} does not hold UTF-8 JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{key!r} must hold a JSON object, got a JSON {type(fields).__name__}")
    for name in ("quant_type", "blocksize", "dtype", "shape"):
        if name not in fields:
            raise ValueError(f"{key!r} has no field {name!r} (found {sorted(fields)})")
    if fields["quant_type"] != "nf4":
        raise ValueError(f"{key!r}: quant_type must be 'nf4', got {fields['quant_type']!r}")
    if not is_blocksize(fields["blocksize"]):
        raise ValueError(f"{key!r}: blocksize must be a power of two from 32 to 4096, got {fields['blocksize']!r}")
    if fields["dtype"] not in _DTYPES:
        raise ValueError(f"{key!r}: dtype must be one of {sorted(_DTYPES)}, got {fields['dtype']!r}")
    shape = fields["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{key!r}: shape must be a list of non-negative ints, got {shape!r}")
    nested = [name for name in _NESTED_FIELDS if name in fields]
    if nested:
        if len(nested) < len(_NESTED_FIELDS):
            missing = sorted(set(_NESTED_FIELDS) - set(nested))
            raise ValueError(f"{key!r} has {nested} but not {missing}: the nested fields come together")
        if not is_blocksize(fields["nested_blocksize"]):
            raise ValueError(f"{key!r}: nested_blocksize must be a power of two from 32 to 4096, "
                             f"got {fields['nested_blocksize']!r}")
        offset = fields["nested_offset"]
        if type(offset) not in (int, float) or not math.isfinite(offset):
            raise ValueError(f"{key!r}: nested_offset must be a finite number, got {offset!r}")
        if fields.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"{key!r}: nested_dtype must be 'float32', got {fields['nested_dtype']!r}")
    return fields


def _entry(state_dict: Mapping, key: str, float_only: bool = False) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"state_dict has no {key!r}")
    t = state_dict[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key!r} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{key!r} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def _count(key: str, t: torch.Tensor, expected: int, why: str) -> None:
    if t.numel() != expected:
        raise ValueError(f"{key!r} must hold {expected} values ({why}), got {t.numel()}")


def from_bnb_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> QuantState:
    """Read an NF4 weight saved by bitsandbytes / Hugging Face (the entries above) into a QuantState.

    Every entry is checked (presence, dtype, size against the shape and the block sizes, the JSON fields,
    and that the nested offset decodes to block absmax values >= 0); a bad one is a ValueError naming its key.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    key = f"{prefix}.quant_state.bitsandbytes__nf4"
    if key not in state_dict:
        found = [k for k in state_dict if isinstance(k, str) and k.startswith(f"{prefix}.quant_state.")]
        raise ValueError(f"state_dict has no {key!r} (found {found}); only NF4 weights can be read")
    fields = _json_fields(state_dict, key)
    shape, blocksize = torch.Size(fields["shape"]), fields["blocksize"]
    n = math.prod(shape)
    blocks = math.ceil(n / blocksize)
    has_tensors = [f"{prefix}.{k}" in state_dict for k in ("nested_absmax", "nested_quant_map")]
    double_quant = "nested_offset" in fields or any(has_tensors)
    if double_quant and "nested_offset" not in fields:
        raise ValueError(f"state_dict has nested tensors under {prefix!r} but {key!r} has no nested_blocksize "
                         f"and nested_offset")

    packed = _entry(state_dict, prefix)
    packed = packed.contiguous().reshape(-1).view(torch.uint8)  # any storage dtype -> its bytes
    _count(prefix, packed, (n + 1) // 2, f"two 4-bit codes per byte for shape {list(shape)}")
    absmax = _entry(state_dict, f"{prefix}.absmax")
    _count(f"{prefix}.absmax", absmax, blocks, f"one per block of {blocksize} for shape {list(shape)}")
    code = _entry(state_dict, f"{prefix}.quant_map", float_only=True)
    check_code(code, f"{prefix}.quant_map")
    state = QuantState(packed=packed, absmax=absmax, code=code.float().reshape(-1), blocksize=blocksize,
                       shape=shape, dtype=_DTYPES[fields["dtype"]], double_quant=double_quant)
    if not double_quant:
        if absmax.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{prefix + '.absmax'!r} must be float (no nested_absmax: not double-quantized), "
                             f"got {absmax.dtype}")
        state.absmax = absmax.float().reshape(-1)
        if blocks and not (torch.isfinite(state.absmax).all() and (state.absmax >= 0).all()):
            raise ValueError(f"{prefix + '.absmax'!r} must hold finite values >= 0 (block maxima of |w|)")
        return check_state(state)

    if absmax.dtype != torch.uint8:
        raise ValueError(f"{prefix + '.absmax'!r} must be uint8 codes beside {prefix + '.nested_absmax'!r}, "
                         f"got {absmax.dtype}")
    nested_absmax = _entry(state_dict, f"{prefix}.nested_absmax", float_only=True)
    nested_code = _entry(state_dict, f"{prefix}.nested_quant_map", float_only=True)
    nested_blocksize = fields["nested_blocksize"]
    _count(f"{prefix}.nested_absmax", nested_absmax, math.ceil(blocks / nested_blocksize),
           f"one per {nested_blocksize} blocks (nested_blocksize) of the {blocks} blocks")
    _count(f"{prefix}.nested_quant_map", nested_code, 256, "the dynamic 8-bit map")
    nested_code = nested_code.float().reshape(-1)
    if not (torch.isfinite(nested_code).all() and nested_code.abs().max() <= 1
            and (nested_code[1:] > nested_code[:-1]).all()):
        raise ValueError(f"{prefix + '.nested_quant_map'!r} must be 256 sorted distinct values in [-1, 1]")
    nested_absmax = nested_absmax.float().reshape(-1)
    if not (torch.isfinite(nested_absmax).all() and (nested_absmax >= 0).all()):
        raise ValueError(f"{prefix + '.nested_absmax'!r} must hold finite values >= 0")
    state.absmax, state.nested_absmax, state.nested_code = absmax.reshape(-1), nested_absmax, nested_code
    state.offset = torch.tensor(float(fields["nested_offset"]), dtype=torch.float32, device=packed.device)
    state.nested_blocksize = nested_blocksize
    check_state(state)
    _check_offset(state, key)
    return state


def _check_offset(state: QuantState, key: str) -> None:
    """nested_offset is mean(absmax), a mean of block maxima of |w|: it is >= 0, and every block absmax it decodes
    to is >= 0 (within the double quantization's error c2 · (G8/2 + 1/65535), plus float32 rounding).
    (An offset too large by some amount still decodes to valid absmax values: the stored codes cannot tell.)"""
    offset = float(state.offset)
    if offset < 0:
        raise ValueError(f"{key!r}: nested_offset must be >= 0 (the mean of the block absmax values), got {offset!r}")
    if state.absmax.numel() == 0:
        return
    a, c2 = dequantize_absmax(state).double(), float(state.nested_absmax.max())
    tol = c2 * (G8 / 2 + 1 / 65535) + 1e-5 * (offset + c2) + 1e-30
    if float(a.min()) < -tol:
        raise ValueError(f"{key!r}: nested_offset {offset!r} decodes block absmax values below 0 "
                         f"({float(a.min())!r}); the nested fields do not belong together")
