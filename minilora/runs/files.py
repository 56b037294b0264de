"""Writing files so that nothing is lost: every write goes to a temporary sibling, then one rename.

A reader (or a crash) sees either the old file or the new one, never half of one. This is the only
place in minilora that writes a file in place of another; everything that saves calls `atomic_write`.

A full disk is not an exception at every step: write(2) may write only part of what it is given and say so in
its return value (the rest of the disk), and only the next write fails with ENOSPC. So every byte goes through
write_all, which writes until all bytes are down or raises, then fsync (which may report ENOSPC or EIO itself).
A new file gets mode 0o666 less the umask, like any file a program creates (0o644 under the usual umask 022).

Temporaries are named `.minilora-<name>.tmp-<pid>-<random>` (temp_name): minilora's prefix, like its marker and
lock, and the writer's pid, so a cleanup removes only minilora's temporaries of processes that are gone.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

TEMP = re.compile(r"^\.minilora-.*\.tmp-(\d+)-[0-9a-f]{8}$")  # temp_name's pattern; group 1: the writer's pid


def temp_name(name: str) -> str:
    """`.minilora-<name>.tmp-<pid>-<random>`: a temporary that can be attributed to minilora and its process."""
    return f".minilora-{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


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


def remove_dead_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove minilora's temporaries (files.temp_name) in `directory` whose pid is no longer alive; return them.
    A temporary of a live process (this one included) is left alone, and so is anything else."""
    removed = []
    for p in Path(directory).glob(".minilora-*.tmp-*"):
        m = TEMP.match(p.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: a short write goes on from where it stopped; a write that
    writes nothing, or fails (ENOSPC on a full disk), raises OSError."""
    view, done = memoryview(data), 0
    while done < len(view):
        n = os.write(fd, view[done:])
        if n <= 0:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a write wrote nothing)")
        done += n


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Create `path` (it must not exist) holding exactly `data`, fsynced; on any error it is removed again."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        path.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory: the renames inside it are on the disk once this returns."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a fresh temporary beside `path` (write_file), then rename it onto `path`."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    write_file(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in chunks of 1 MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(path: str | os.PathLike, what: str) -> dict:
    """The tensors of a safetensors file; a truncated or foreign file is a ValueError naming it and `what` it
    should be (safetensors raises its own error types, which would otherwise end in a traceback)."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001  (SafetensorError, and whatever a damaged header gives)
        cause = " ".join(str(e).split())[:200]
        raise ValueError(f"{what}: {path} is not a readable safetensors file ({cause})") from None


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """The bytes of a safetensors file (written by atomic_write, so a full disk is caught)."""
    from safetensors.torch import save
    return save(tensors, metadata=metadata or {"format": "pt"})


def read_json_object(path: str | os.PathLike, caller: str) -> dict:
    """The JSON object in the file `path`; a missing file, bad JSON or another JSON value is one error line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{caller}: {path} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{caller}: {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{caller}: {path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Put the finished directory `src` in place of `dst`, then remove the previous `dst`.

    Where the kernel can swap two names atomically, `dst` is at every instant either the old directory or
    the new one. Elsewhere the old one is first renamed aside (a temp_name sibling), so a
    crash between the two renames leaves the old version beside the missing name, never half of either."""
    import shutil
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return dst
    if _exchange(src, dst):
        shutil.rmtree(src)  # now holds the previous dst
        return dst
    aside = dst.with_name(temp_name(f"{dst.name}.old"))
    os.replace(dst, aside)
    os.replace(src, dst)
    shutil.rmtree(aside)
    return dst
