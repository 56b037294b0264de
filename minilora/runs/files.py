"""Writing files so that nothing is lost: every write goes to a temporary sibling, then one rename.

A reader (or a crash) sees either the old file or the new one, never half of one. This is the only
place in minilora that writes a file in place of another; everything that saves calls `atomic_write`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a fresh temporary path beside `path`, fsync it, then rename it onto `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


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
    the new one. Elsewhere the old one is first renamed aside (a `<name>.old.tmp-<pid>-...` sibling), so a
    crash between the two renames leaves the old version beside the missing name, never half of either."""
    import secrets
    import shutil
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return dst
    if _exchange(src, dst):
        shutil.rmtree(src)  # now holds the previous dst
        return dst
    aside = dst.with_name(f".{dst.name}.old.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(dst, aside)
    os.replace(src, dst)
    shutil.rmtree(aside)
    return dst
