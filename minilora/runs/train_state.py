"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

    <out>/checkpoint/
        trainable.safetensors   the trainable parameters by name (all for full fine-tuning, else lora_A / lora_B)
        optimizer.safetensors   the optimizer's tensors (AdamW: step, exp_avg, exp_avg_sq per parameter)
        rng.safetensors         torch's CPU (and CUDA) random state and the data sampler's generator state
        state.json              step, history, the optimizer's non-tensor state, the sha256 of each file above,
                                what a resumed run may not change (run settings; minilora.runs.rundir.identity: data,
                                model and adapter config, tokenizer, frozen base), its own integrity hash

No pickle anywhere. At every instant at least one complete checkpoint is reachable: a save writes a fresh
`checkpoint.tmp-<pid>-<random>` (state.json last, all fsynced); then, if `checkpoint` is complete, drops
`checkpoint.old` and renames checkpoint -> checkpoint.old; renames tmp -> checkpoint; drops checkpoint.old.
A checkpoint is dropped state.json first, so a half-deleted one never looks complete; find_checkpoint takes
the newest complete one. Loading validates state.json (schema, integrity hash), every file's hash, names and
shapes, and refuses another run's checkpoint naming what differs (CheckpointError). Non-finite weights are
never saved (TrainingDiverged).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .tensor_tree import flatten, unflatten
from .rundir import first_difference, remove_dead_temps, temp_name

FORMAT = "minilora-train-state"
VERSION = 2
NAME, OLD = "checkpoint", "checkpoint.old"
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
SCHEMA = {"format": str, "version": int, "step": int, "run": dict, "identity": dict, "history": dict,
          "optimizer": dict, "files": dict, "integrity": str}
HISTORY = {"losses": list, "evals": list, "tokens": int, "seconds": (int, float)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or written for a different run."""


class TrainingDiverged(RuntimeError, ValueError):
    """The loss, the gradient norm or a weight became inf or NaN: the run stops and the last checkpoint stays
    as it was. (A RuntimeError: the run failed; a ValueError: its settings made it fail.)"""


# ----- what a checkpoint belongs to -----

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def integrity(state: dict) -> str:
    """sha256 of state.json's content without its own `integrity` field (canonical JSON)."""
    body = {k: v for k, v in state.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state(), "sampler": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _fsync(path: Path, data: bytes = b"") -> None:
    """fsync a file or directory; with data, first create the file holding it (inside the tmp directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) if data else os.open(path, os.O_RDONLY)
    try:
        if data:
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop(checkpoint: Path) -> None:
    """Remove a checkpoint directory, state.json first (so it never looks complete while half deleted)."""
    (checkpoint / "state.json").unlink(missing_ok=True)
    shutil.rmtree(checkpoint)


def save_train_state(out_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | dict,
                     generator: torch.Generator, step: int, run: dict, identity: dict, history: dict) -> Path:
    """Write <out_dir>/checkpoint so that a complete checkpoint is reachable at every instant (module docstring).
    optimizer: the optimizer, or its state_dict with whole tensors (a sharded run's, gathered)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    final, old = out_dir / NAME, out_dir / OLD
    remove_dead_temps(out_dir, NAME)  # left behind by a crashed save; a live process's are left alone
    tmp = out_dir / temp_name(NAME)
    os.mkdir(tmp)
    try:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_meta = flatten(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), opt_tensors)
        hashes = {}
        for fname, tensors in zip(FILES, (trainable, opt_tensors, _rng_tensors(generator))):
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            _fsync(tmp / fname)
            hashes[fname] = sha256(tmp / fname)
        state = {"format": FORMAT, "version": VERSION, "step": step, "run": run, "identity": identity,
                 "history": history, "optimizer": opt_meta, "files": hashes}
        state["integrity"] = integrity(json.loads(json.dumps(state)))
        _fsync(tmp / "state.json", json.dumps(state, indent=1).encode())
        _fsync(tmp)
        if (final / "state.json").is_file():  # the current checkpoint is complete: old may go, it moves aside
            if old.exists():
                _drop(old)
            os.replace(final, old)
        elif final.exists():  # a `checkpoint` without state.json is no checkpoint (this code never makes one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(out_dir)
        if old.exists():
            _drop(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def validate_state(state: Any, path: Path) -> dict:
    """Raise CheckpointError naming the key unless state.json has every key with its type, step >= 0, a
    history of `step` losses, a sha256 for each tensor file, and an intact integrity hash."""
    bad = lambda what: CheckpointError(f"checkpoint {path}: state.json {what}")  # noqa: E731
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise bad(f"is not a {FORMAT} file")
    if state.get("version") != VERSION:
        raise bad(f"has version {state.get('version')!r}, this minilora reads version {VERSION}")
    for section, schema in (("", SCHEMA), ("history.", HISTORY)):
        for key, kind, d in ((k, t, state["history"] if section else state) for k, t in schema.items()):
            if key not in d:
                raise bad(f"lacks the key {section + key!r}")
            if isinstance(d[key], bool) or not isinstance(d[key], kind):
                raise bad(f"has {section + key}={d[key]!r}, expected {getattr(kind, '__name__', 'a number')}")
    h = state["history"]
    if state["step"] < 0 or len(h["losses"]) != state["step"] or h["tokens"] < 0 or not h["seconds"] >= 0:
        raise bad(f"has step={state['step']} with {len(h['losses'])} losses, tokens={h['tokens']}, "
                  f"seconds={h['seconds']}: expected step >= 0, one loss per step, tokens and seconds >= 0")
    files = state["files"]
    if sorted(files) != sorted(FILES) or not all(isinstance(v, str) and len(v) == 64 for v in files.values()):
        raise bad(f"'files' must give the sha256 of exactly {', '.join(FILES)}; it lists {sorted(files)}")
    if integrity(state) != state["integrity"]:
        raise bad("does not match its integrity hash (edited or corrupt)")
    return state


def read_state(path: str | os.PathLike) -> dict:
    """state.json of a checkpoint, validated (validate_state) and checked against the hashes of its files."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: state.json is unreadable ({e})") from None
    validate_state(state, path)
    for fname, digest in state["files"].items():
        if not (path / fname).is_file() or sha256(path / fname) != digest:
            raise CheckpointError(f"checkpoint {path}: {fname} is " + ("corrupt (sha256 does not match state.json)"
                                                                        if (path / fname).is_file() else "missing"))
    return state


def find_checkpoint(out_dir: str | os.PathLike) -> Path:
    """The newest complete checkpoint in out_dir: `checkpoint`, or `checkpoint.old` where a save was cut off.
    A directory without state.json is incomplete and skipped; one with a state.json must verify."""
    out_dir = Path(out_dir)
    found = [(read_state(p)["step"], i, p) for i, p in enumerate((out_dir / OLD, out_dir / NAME))
             if (p / "state.json").is_file()]
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {out_dir} (expected {out_dir / NAME}/state.json)")
    return max(found)[2]


def load_train_state(out_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, run: dict, identity: dict, replica=None) -> dict:
    """Restore trainable weights, optimizer, RNG states; return state.json (step, history). Nothing is
    modified unless every check passes: state.json, hashes, run settings, identity, names and shapes.
    replica (minilora.parallel.replica.SingleProcess or a sharded one) keeps this process's part of each tensor."""
    from safetensors.torch import load_file

    path = find_checkpoint(out_dir)
    state = read_state(path)
    for saved, now in ((state["run"], run), (state["identity"], identity)):
        if d := first_difference(saved, now, ""):
            hashed = {"data": "training data", "val_data": "validation data", "frozen": "frozen base weights"}
            what = f"{d[0]}={d[1]!r}, this run has {d[0]}={d[2]!r}" if d[0] not in hashed else \
                f"other {hashed[d[0]]} ({d[0]} sha256 {str(d[1])[:12]}..., this run's {str(d[2])[:12]}...)"
            raise CheckpointError(f"checkpoint {path} was written with {what}: resume with the same settings, "
                                  f"or start a new run in another directory")
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
    try:  # before the weights: a state that does not fit leaves the model as it was
        opt_state = unflatten(state["optimizer"], opt_tensors)
        if replica is None:
            optimizer.load_state_dict(opt_state)
        else:
            replica.load_optimizer_state(optimizer, opt_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({e})") from None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(trainable[n] if replica is None else replica.local(trainable[n], p))
    torch.set_rng_state(rng["torch_cpu"])
    generator.set_state(rng["sampler"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


class RunCheckpoints:
    """The trainer's checkpoints in one run directory (None: nothing happens). Only the holder of the
    directory's lock writes (under torchrun, rank 0); every rank reads on resume."""

    def __init__(self, run_dir, *, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                 run: dict, identity: dict, replica=None):
        self.run_dir, self.run, self.identity, self.replica = run_dir, run, identity, replica
        self.objects = dict(model=model, optimizer=optimizer, generator=generator)
        self.writes = run_dir is not None and run_dir.locked

    def resume(self) -> tuple[int, dict]:
        """Restore the newest checkpoint (load_train_state); return its step and history."""
        state = load_train_state(self.run_dir.path, **self.objects, run=self.run, identity=self.identity,
                                 replica=self.replica)
        return state["step"], state["history"]

    def save(self, step: int, history: dict) -> None:
        """save_train_state, unless a trainable weight is inf or NaN (TrainingDiverged: the last one stays).
        A sharded run first gathers whole tensors on every rank (collectives); the lock holder writes."""
        with self._whole() as optimizer:
            self._save(step, history, optimizer)

    def _save(self, step: int, history: dict, optimizer) -> None:
        if optimizer is None:
            return
        if not all(bool(torch.isfinite(p).all()) for p in self.objects["model"].parameters() if p.requires_grad):
            raise TrainingDiverged(f"training diverged before step {step}: a trainable weight is inf or NaN; "
                                   f"not saved, the last checkpoint is kept. Lower the learning rate")
        if self.writes:
            save_train_state(self.run_dir.path, **{**self.objects, "optimizer": optimizer}, step=step,
                             run=self.run, identity=self.identity, history=history)

    @contextlib.contextmanager
    def _whole(self):
        """The model's whole tensors in its modules and the optimizer's state (None where this process has
        nothing to do: no run directory, or a rank of an unsharded run that does not write)."""
        rep = self.replica
        sharded = rep is not None and rep.sharded
        if self.run_dir is None or not (self.writes or sharded):
            yield None
            return
        optimizer = rep.optimizer_state(self.objects["optimizer"]) if sharded else self.objects["optimizer"]
        with rep.gathered() if sharded else contextlib.nullcontext():
            yield optimizer

    def finish(self, step: int, history: dict, write_results) -> None:
        """The last checkpoint, then write_results(staged): each result is renamed into the run directory when
        complete, metrics.json last (minilora.runs.RunDir.results)."""
        with self._whole() as optimizer:
            self._save(step, history, optimizer)
            if optimizer is not None and self.writes:
                with self.run_dir.results(last=("metrics.json",)) as staged:
                    write_results(staged)
