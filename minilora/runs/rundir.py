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

Nothing a run did not create is ever deleted or replaced, --overwrite or not: a result's name (RESULTS) is
replaced only when minilora can show it wrote what is there now, by the manifest in the marker
({"files": {relative path: [sha256, ...]}}, written before a result is moved into place and pruned after), or,
for a checkpoint, by its own state.json, which lists the sha256 of each of its files. Anything else under such
a name is refused before any work starts, naming it. Besides that, only minilora's own temporaries are removed.

An unfinished run (a checkpoint whose step is below its run's steps) is continued with resume=True (--resume)
or started again with overwrite=True (--overwrite); a run without either is refused, so it is never discarded
by accident.

The lock: a run holds an exclusive `fcntl.flock` on `<dir>/.minilora.lock` while it works, and writes its
pid into it. A second run into the same directory is refused naming that pid. The kernel drops a flock when
its process ends, however it ends (kill -9 included), so a lock left by a dead process is simply taken
over. (The lock file is never replaced or deleted: a new inode would be a second, unrelated lock.)

Temporaries carry minilora's prefix and their writer's pid, `.minilora-<name>.tmp-<pid>-<random>`
(files.temp_name); remove_dead_temps removes only those whose process is gone, so one run's cleanup can never
delete another live run's work, nor a user's file that merely looks like a temporary.

What a run is, besides its directory (what a resumed run may not change): minilora.runs.identity.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .files import TEMP, atomic_write_json, remove_dead_temps, replace_dir, sha256, temp_name

MARKER = "minilora_run.json"
LOCK = ".minilora.lock"
FORMAT = "minilora-run"
KINDS = ("pretrain", "finetune", "demo")
CHECKPOINTS = ("checkpoint", "checkpoint.old")  # minilora.runs.train_state's names
RESULTS = {"finetune": (*CHECKPOINTS, "adapter", "model", "metrics.json"),  # what each kind writes
           "pretrain": ("config.json", "model.safetensors", "minilora_tokenizer.json", "pretrain.json"),
           "demo": ("yoda_train.jsonl", "yoda_val.jsonl", "loss_curves.png", "summary.json")}


class RunDirError(ValueError):
    """A run directory that this run may not write into (refused before any work starts)."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


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


def manifest(path: Path) -> dict[str, list[str]]:
    """{relative path: [sha256, ...]} of the results minilora wrote into the run directory `path`."""
    files = (read_marker(path) or {}).get("files")
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, list)}


def _vouched(d: Path) -> dict | None:
    """state.json of a directory that vouches for itself (a checkpoint): it lists the sha256 of each of its
    other files and nothing else is in it; else None."""
    try:
        state = json.loads((d / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = state.get("files") if isinstance(state, dict) else None
    if not (isinstance(files, dict) and str(state.get("format", "")).startswith("minilora-")):
        return None
    if {e.name for e in d.iterdir()} != {"state.json", *files}:
        return None
    ok = all(isinstance(h, str) and (d / n).is_file() and not (d / n).is_symlink() and sha256(d / n) == h
             for n, h in files.items())
    return state if ok else None


def owned(path: Path, name: str) -> bool:
    """Whether minilora may replace or delete `path/name`: it is absent; or a directory that vouches for itself
    (_vouched: a checkpoint); or every file under it is in the manifest with the sha256 it has now."""
    target = path / name
    if not os.path.lexists(target):
        return True
    if target.is_symlink():
        return False
    if target.is_dir() and _vouched(target) is not None:
        return True
    files = manifest(path)
    for f in (target.rglob("*") if target.is_dir() else [target]):
        if f.is_symlink() or not (f.is_file() or f.is_dir()):
            return False
        if f.is_file() and sha256(f) not in files.get(f.relative_to(path).as_posix(), ()):
            return False
    return True


def not_owned_error(path: Path, name: str) -> RunDirError:
    return RunDirError(f"{path / name} was not written by minilora (or has changed since): minilora never deletes "
                       f"or replaces it, --overwrite included; move it away or choose another directory")


def unfinished(path: Path) -> tuple[int, int] | None:
    """(step, steps) of the newest checkpoint in `path` when its step is below its run's steps (the run stopped
    early: Ctrl-C, a crash); None when there is none or it is finished. Reads minilora.runs.train_state's
    state.json: "step", and "run": {"steps"}."""
    states = [s for s in (_vouched(path / n) for n in CHECKPOINTS if (path / n).is_dir()) if s is not None]
    if not states:
        return None
    state = max(states, key=lambda s: s.get("step", 0) if isinstance(s.get("step"), int) else 0)
    step, steps = state.get("step"), (state.get("run") or {}).get("steps")
    return (step, steps) if isinstance(step, int) and isinstance(steps, int) and step < steps else None


def lock_holder(path: Path) -> str | None:
    """The pid written in the lock of a run directory that a live process holds now, else None (a probe:
    the lock is taken and given back at once, or not at all)."""
    import fcntl
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # closing gives a taken probe lock back
    return None


def locked_error(path, holder: str) -> RunLockedError:
    return RunLockedError(f"{path} is in use by another minilora run (pid {holder}); wait for it to finish, or "
                          f"choose another directory")


def check_run_dir(path: str | os.PathLike, kind: str, overwrite: bool = False, resume: bool = False,
                  probe: bool = True) -> Path:
    """Raise RunDirError unless a run of `kind` may write into `path` (the rules in the module docstring);
    return the resolved path. Reads only: nothing is created. probe: refuse a directory whose lock another
    process holds (RunLockedError; off where the caller holds the lock itself)."""
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
    if probe and (holder := lock_holder(p)):
        raise locked_error(path, holder)
    others = [e.name for e in p.iterdir() if e.name not in (MARKER, LOCK) and not TEMP.match(e.name)]
    for name in RESULTS[kind]:  # (a resumed run's checkpoint is verified by the loader, which names what is wrong)
        if not (resume and name in CHECKPOINTS) and not owned(p, name):
            raise not_owned_error(Path(path), name)
    if kind == "finetune" and not (resume or overwrite) and (left := unfinished(p)):
        raise RunDirError(f"{path} holds an unfinished run (a checkpoint at step {left[0]} of {left[1]}): pass "
                          f"--resume (resume=True) to continue it, or --overwrite (overwrite=True) to start again "
                          f"and replace its checkpoint")
    if marker is not None and marker["kind"] == kind or not others and marker is None or overwrite:
        return p
    what = f"a minilora {marker['kind']} run" if marker else f"not empty ({len(others)} entries, e.g. {sorted(others)[0]!r})"
    raise RunDirError(f"{path} is {what}, not a {kind} run directory: choose an empty or new directory, or pass "
                      f"--overwrite (overwrite=True) to write this run's files into it (nothing else is deleted)")


class RunDir:
    """An open run directory: checked (check_run_dir), created, marked, and locked until close().

    lock=False: a data-parallel rank other than 0, which writes nothing and takes rank 0's verdict on the
    directory (minilora.parallel.decide): the path is resolved, nothing is read, checked or created (only one
    process may look at a directory another one is creating). wait=True waits for a held lock instead of
    refusing (a shared cache that another process is filling)."""

    def __init__(self, path: str | os.PathLike, kind: str, overwrite: bool = False, lock: bool = True,
                 wait: bool = False, resume: bool = False):
        self.kind, self._fd = kind, None
        if not lock:
            self.path = resolve(path)
            return
        self.path = check_run_dir(path, kind, overwrite, resume, probe=not wait)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {path}: {e.strerror}") from None
        self._lock(wait)
        try:
            check_run_dir(self.path, kind, overwrite, resume, probe=False)  # again, under the lock
            if (read_marker(self.path) or {}).get("kind") != kind:
                self._write_marker(manifest(self.path))
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
            raise locked_error(self.path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # in place: the lock file's inode must stay the same
        self._fd = fd

    def _write_marker(self, files: dict[str, list[str]]) -> None:
        atomic_write_json(self.path / MARKER, {"format": FORMAT, "kind": self.kind, "files": files})

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
        says "complete"): a file by one rename, a directory by files.replace_dir. What is there now is replaced
        only if it is minilora's (owned), and the manifest lists the new files' sha256 before they move (beside
        the old ones'), so a crash at any point leaves every result accounted for. On an error nothing moves
        and the staging directory is removed."""
        staged = self.path / temp_name("staging")
        staged.mkdir()
        try:
            yield staged
            names = sorted(e.name for e in staged.iterdir() if e.name not in last)
            names += [n for n in last if (staged / n).exists()]
            for name in names:
                if not owned(self.path, name):
                    raise not_owned_error(self.path, name)
            new = {f.relative_to(staged).as_posix(): sha256(f) for f in staged.rglob("*") if f.is_file()}
            files = manifest(self.path)
            self._write_marker({**files, **{k: [*files.get(k, []), h] for k, h in new.items()}})
            for name in names:
                (replace_dir if (staged / name).is_dir() else os.replace)(staged / name, self.path / name)
            kept = {k: v for k, v in files.items() if k.split("/")[0] not in names}
            self._write_marker({**kept, **{k: [h] for k, h in new.items()}})
        finally:
            shutil.rmtree(staged, ignore_errors=True)
