"""What a run is, besides its directory: what a resumed run may not change (machinery).

`identity`: the data's sha256, the model's config, the adapters' r / alpha / use_rslora, the tokenizer, the
frozen base weights' sha256 (`fingerprint`); `first_difference` names the first field two of them differ in.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from typing import Any

import torch
import torch.nn as nn


def fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every tensor in the state dict that is not trainable:
    the frozen base a LoRA checkpoint belongs to (resuming onto other base weights would be wrong)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name in trainable:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def data_fingerprint(data) -> str:
    """sha256 of every (x, y) a dataset can give (a TokenStream: its tokens and block size)."""
    h = hashlib.sha256(f"{type(data).__name__}:{len(data)}:{getattr(data, 'block_size', None)};".encode())
    if isinstance(getattr(data, "tokens", None), torch.Tensor):
        h.update(data.tokens.contiguous().numpy().tobytes())
        return h.hexdigest()
    for i in range(0, len(data), 256):
        for t in data.collate(list(range(i, min(i + 256, len(data))))):
            h.update(f"{tuple(t.shape)};".encode() + t.contiguous().numpy().tobytes())
    return h.hexdigest()


def identity(model: nn.Module, train_data, val_data=None) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint, besides its settings: the data,
    the model's config, every adapter's r / alpha / use_rslora, the tokenizer, the frozen base weights."""
    config = asdict(model.config) if is_dataclass(getattr(model, "config", None)) else None
    adapters = {n: {"r": m.r, "alpha": m.alpha, "use_rslora": m.use_rslora}
                for n, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), nn.Parameter)}
    tok = getattr(train_data, "tokenizer", None)
    probe = "The quick brown fox, 1234 (jumps)!\n"
    tokenizer = None if tok is None else {"class": type(tok).__name__, "vocab_size": tok.vocab_size,
                                          "eos_id": tok.eos_id, "probe": list(tok.encode(probe))}
    return json.loads(json.dumps({  # checked in this order: the most telling difference is named first
        "model": config, "adapter": adapters, "tokenizer": tokenizer, "data": data_fingerprint(train_data),
        "val_data": None if val_data is None else data_fingerprint(val_data), "frozen": fingerprint(model)}))


def first_difference(saved: Any, now: Any, name: str) -> tuple[str, Any, Any] | None:
    """(dotted name, saved value, current value) of the first place two JSON values differ, or None."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in [*now, *(k for k in saved if k not in now)]:  # in the order of the current run's fields
            d = first_difference(saved.get(k), now.get(k), f"{name}.{k}" if name else k)
            if d:
                return d
        return None
    return None if saved == now else (name, saved, now)
