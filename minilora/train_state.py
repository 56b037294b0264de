"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

    <out>/checkpoint/
        trainable.safetensors   the trainable parameters by name (all of them for full fine-tuning,
                                only lora_A / lora_B for LoRA and QLoRA)
        optimizer.safetensors   the optimizer's tensors (AdamW: step, exp_avg, exp_avg_sq per parameter)
        rng.safetensors         torch's CPU (and CUDA) random state and the data sampler's generator state
        state.json              step, run config, history, the optimizer's non-tensor state, the
                                fingerprint of the frozen weights, and the sha256 of each file above

No pickle anywhere: tensors go to safetensors, everything else to JSON.

Atomic: a checkpoint is written into a fresh `checkpoint.tmp-<pid>` directory, flushed to disk, and only
then swapped in (checkpoint -> checkpoint.old, tmp -> checkpoint, drop checkpoint.old). A crash at any
moment leaves either the old or the new checkpoint complete; if it strikes between the two renames,
`checkpoint.old` is the one read back. Loading verifies every hash and every name and shape, and refuses
a corrupt or mismatched checkpoint with CheckpointError instead of training on from garbage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

FORMAT = "minilora-train-state"
VERSION = 1
NAME = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or written for a different run."""


# ----- generic (nested dict / list / tuple / tensor / scalar) <-> (JSON, tensors) -----

def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """obj as JSON-able data; every tensor is moved into `tensors` under its path and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[flatten(k, tensors, f"{path}.key{i}"), flatten(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint (tensors and JSON only)")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten."""
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint refers to tensor {key!r}, which its files lack")
            return tensors[key]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    return obj


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state(), "sampler": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- save / load -----

def save_train_state(out_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, step: int, run: dict, history: dict,
                     frozen_fingerprint: str) -> Path:
    """Write <out_dir>/checkpoint atomically (tmp dir, fsync, rename swap). Returns its path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, old = out_dir / NAME, out_dir / f"{NAME}.old"
    for stale in out_dir.glob(f"{NAME}.tmp-*"):  # left behind by a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f"{NAME}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_meta = flatten(optimizer.state_dict(), opt_tensors)
        files = {"trainable.safetensors": trainable, "optimizer.safetensors": opt_tensors,
                 "rng.safetensors": _rng_tensors(generator)}
        hashes = {}
        for fname, tensors in files.items():
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            _fsync(tmp / fname)
            hashes[fname] = sha256(tmp / fname)
        state = {"format": FORMAT, "version": VERSION, "step": step, "run": run, "history": history,
                 "optimizer": opt_meta, "frozen_fingerprint": frozen_fingerprint, "files": hashes}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        _fsync(tmp / "state.json")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def find_checkpoint(out_dir: str | os.PathLike) -> Path:
    """<out_dir>/checkpoint, or checkpoint.old if a save was cut off between its two renames."""
    out_dir = Path(out_dir)
    for p in (out_dir / NAME, out_dir / f"{NAME}.old"):
        if (p / "state.json").is_file():
            return p
    raise FileNotFoundError(f"no checkpoint to resume from in {out_dir} (expected {out_dir / NAME}/state.json)")


def read_state(path: str | os.PathLike) -> dict:
    """state.json of a checkpoint, checked for format and for the hashes of its files."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: state.json is unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: state.json is not a {FORMAT} file")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: version {state.get('version')}, this minilora reads {VERSION}")
    for fname, digest in state.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {fname} is missing")
        if sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {fname} is corrupt (sha256 does not match state.json)")
    return state


def load_train_state(out_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, run: dict, frozen_fingerprint: str) -> dict:
    """Restore trainable weights, optimizer, RNG states; return state.json (step, history). Nothing is
    modified unless every check passes: hashes, run settings, frozen-weight fingerprint, names and shapes."""
    from safetensors.torch import load_file

    path = find_checkpoint(out_dir)
    state = read_state(path)
    saved_run = state.get("run", {})
    for key in sorted(set(run) | set(saved_run)):
        if saved_run.get(key) != run.get(key):
            raise CheckpointError(f"checkpoint {path} was written with {key}={saved_run.get(key)!r}, "
                                  f"this run has {key}={run.get(key)!r}")
    if state.get("frozen_fingerprint") != frozen_fingerprint:
        raise CheckpointError(f"checkpoint {path} belongs to other frozen base weights than this model's")
    try:
        trainable = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as e:  # safetensors raises its own error types on malformed files
        raise CheckpointError(f"checkpoint {path}: unreadable tensors ({e})") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(trainable):
        diff = sorted(set(params) ^ set(trainable))
        raise CheckpointError(f"checkpoint {path}: trainable parameters differ from the model's, e.g. {diff[0]!r}")
    for n, p in params.items():
        if trainable[n].shape != p.shape or trainable[n].dtype != p.dtype:
            raise CheckpointError(f"checkpoint {path}: {n} is {tuple(trainable[n].shape)} {trainable[n].dtype}, "
                                  f"the model has {tuple(p.shape)} {p.dtype}")
    if "torch_cpu" not in rng or "sampler" not in rng:
        raise CheckpointError(f"checkpoint {path}: rng.safetensors lacks the random states")
    opt_state = unflatten(state["optimizer"], opt_tensors)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(trainable[n])
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({e})") from None
    torch.set_rng_state(rng["torch_cpu"])
    generator.set_state(rng["sampler"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state
