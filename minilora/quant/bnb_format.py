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

import torch

from .codebooks import nf4_code
from .state import QuantState

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _pack_json(fields: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.reshape(-1).cpu().tolist()).decode("utf-8"))


def to_bnb_state_dict(state: QuantState, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' Linear4bit saves for this NF4 weight (see module docstring)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    if not torch.equal(state.code.float().cpu(), nf4_code()):
        raise ValueError("only the NF4 codebook has a bitsandbytes name; this state uses another code")
    fields = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": _NAMES[state.dtype],
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


def from_bnb_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> QuantState:
    """Read an NF4 weight saved by bitsandbytes / Hugging Face (the entries above) into a QuantState."""
    key = f"{prefix}.quant_state.bitsandbytes__nf4"
    if key not in state_dict:
        found = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.")]
        raise ValueError(f"state_dict has no {key!r} (found {found}); only NF4 weights can be read")
    fields = _unpack_json(state_dict[key])
    if fields.get("quant_type") != "nf4" or fields.get("dtype") not in _DTYPES:
        raise ValueError(f"expected an nf4 weight of float32/float16/bfloat16, got {fields}")
    double_quant = f"{prefix}.nested_absmax" in state_dict
    absmax = state_dict[f"{prefix}.absmax"]
    packed = state_dict[prefix].contiguous().view(torch.uint8).reshape(-1)  # any storage dtype -> bytes
    state = QuantState(packed=packed,
                       absmax=absmax.to(torch.uint8) if double_quant else absmax.float(),
                       code=state_dict[f"{prefix}.quant_map"].float(), blocksize=int(fields["blocksize"]),
                       shape=torch.Size(fields["shape"]), dtype=_DTYPES[fields["dtype"]], double_quant=double_quant)
    if double_quant:
        state.offset = torch.tensor(float(fields["nested_offset"]), dtype=torch.float32)
        state.nested_absmax = state_dict[f"{prefix}.nested_absmax"].float()
        state.nested_code = state_dict[f"{prefix}.nested_quant_map"].float()
        state.nested_blocksize = int(fields["nested_blocksize"])
    return state
