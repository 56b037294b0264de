"""Run directories: where a command writes its results, what it may replace, and who is writing there now.

A run directory holds one run's results, a marker `minilora_run.json` ({"format": "minilora-run", "kind": ...};
kinds: pretrain, finetune, demo) and a lock file `.minilora.lock`. Opening one (RunDir) checks, before any
work starts:

    the path is resolved first         `a/b/..` is `a`, `.` is the current directory
    missing or empty                   it becomes a run directory of this kind
    a minilora run of the same kind    reused: its results are replaced, each one written to a temporary
                                       sibling and renamed into place; nothing else in it is touched
    anything else that is not empty    (a user's files, a run of another kind) refused, unless overwrite=True:
                                       then the run writes its own results beside what is there
    a file, an unwritable directory    refused

Nothing a run did not create is ever deleted: the only things removed are minilora's own temporaries and
the previous version of a result it replaces.

The lock: a run holds an exclusive `fcntl.flock` on `<dir>/.minilora.lock` while it works, and writes its
pid into it. A second run into the same directory is refused naming that pid. The kernel drops a flock when
its process ends, however it ends (kill -9 included), so a lock left by a dead process is simply taken
over. (The lock file is never replaced or deleted: a new inode would be a second, unrelated lock.)

Temporaries carry their writer's pid, `<name>.tmp-<pid>-<random>`; remove_dead_temps removes only those whose
process is gone, so one run's cleanup can never delete another live run's work.

What a run is, besides its directory: `identity`, what a resumed run may not change (the data's sha256, the
model's config, the adapters' r / alpha / use_rslora, the tokenizer, the frozen base weights' sha256).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .files import atomic_write_json, replace_dir

MARKER = "minilora_run.json"
LOCK = ".minilora.lock"
FORMAT = "minilora-run"
KINDS = ("pretrain", "finetune", "demo")
_TEMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")


class RunDirError(ValueError):
    """A run directory that this run may not write into (refused before any work starts)."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


def temp_name(name: str) -> str:
    """`<name>.tmp-<pid>-<random>`: a temporary that remove_dead_temps can attribute to its process."""
    return f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (signal 0 probes without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


def remove_dead_temps(directory: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Remove `<prefix>*.tmp-<pid>-*` entries of `directory` whose pid is no longer alive; return them.
    A temporary of a live process (this one included) is left alone."""
    removed = []
    for p in Path(directory).glob(f"{prefix}*.tmp-*"):
        m = _TEMP.search(p.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def resolve(path: str | os.PathLike) -> Path:
    """The absolute, symlink- and `..`-free path (so `a/b/..` is `a` and `.` has a name)."""
    if not str(path).strip():
        raise RunDirError("the run directory must not be an empty path")
    return Path(path).expanduser().resolve()


def read_marker(path: Path) -> dict | None:
    """The marker of a minilora run directory, or None if `path` holds none (or a file of that name that is
    not minilora's)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(marker, dict) and marker.get("format") == FORMAT and isinstance(marker.get("kind"), str):
        return marker
    return None


def check_run_dir(path: str | os.PathLike, kind: str, overwrite: bool = False) -> Path:
    """Raise RunDirError unless a run of `kind` may write into `path` (the rules in the module docstring);
    return the resolved path. Reads only: nothing is created."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    p = resolve(path)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{path} is not a directory; a run needs a directory to write into")
    if not p.exists():
        parent = next(a for a in p.parents if a.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise RunDirError(f"cannot create run directory {path}: {parent} is not a writable directory")
        return p
    if not os.access(p, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write into run directory {path} (no write permission)")
    marker = read_marker(p)
    if (p / MARKER).exists() and marker is None:
        raise RunDirError(f"{path} holds a {MARKER} that is not minilora's; choose another directory")
    others = [e.name for e in p.iterdir() if e.name not in (MARKER, LOCK) and not e.name.startswith(f".{MARKER}.")]
    if marker is not None and marker["kind"] == kind or not others and marker is None or overwrite:
        return p
    what = f"a minilora {marker['kind']} run" if marker else f"not empty ({len(others)} entries, e.g. {sorted(others)[0]!r})"
    raise RunDirError(f"{path} is {what}, not a {kind} run directory: choose an empty or new directory, or pass "
                      f"--overwrite (overwrite=True) to write this run's files into it (nothing else is deleted)")


class RunDir:
    """An open run directory: checked (check_run_dir), created, marked, and locked until close().

    lock=False checks and reads only (the data-parallel ranks other than 0, which write nothing);
    wait=True waits for a held lock instead of refusing (a shared cache that another process is filling)."""

    def __init__(self, path: str | os.PathLike, kind: str, overwrite: bool = False, lock: bool = True,
                 wait: bool = False):
        self.path, self.kind, self._fd = check_run_dir(path, kind, overwrite), kind, None
        if not lock:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {path}: {e.strerror}") from None
        self._lock(wait)
        try:
            check_run_dir(self.path, kind, overwrite)  # again, under the lock: another run may have been first
            if (read_marker(self.path) or {}).get("kind") != kind:
                atomic_write_json(self.path / MARKER, {"format": FORMAT, "kind": kind})
            remove_dead_temps(self.path)
        except BaseException:
            self.close()
            raise

    def _lock(self, wait: bool) -> None:
        import fcntl
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.path} is in use by another minilora run (pid {holder}); wait for it to "
                                 f"finish, or choose another directory") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # in place: the lock file's inode must stay the same
        self._fd = fd

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the lock (the lock file stays: see the module docstring)."""
        if self._fd is not None:
            import fcntl
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def results(self, last: tuple[str, ...] = ()):
        """with run_dir.results() as staged: write results into `staged`, a fresh temporary directory inside
        the run directory. At the end each entry is moved into place, the names in `last` last (the file that
        says "complete"): a file by one rename, a directory by files.replace_dir. On an error nothing moves
        and the staging directory is removed."""
        staged = self.path / temp_name(".staging")
        staged.mkdir()
        try:
            yield staged
            names = sorted(e.name for e in staged.iterdir() if e.name not in last)
            for name in names + [n for n in last if (staged / n).exists()]:
                (replace_dir if (staged / name).is_dir() else os.replace)(staged / name, self.path / name)
        finally:
            shutil.rmtree(staged, ignore_errors=True)


# ----- what a run may not change when it resumes -----

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
