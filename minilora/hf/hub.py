"""Machinery: a Hugging Face model id in place of a directory, resolved through huggingface_hub's cache.

A path that exists is used as it is. Anything else that looks like a model id ("org/name") is looked up with
huggingface_hub.snapshot_download: from the local cache when it holds the files (always, with HF_HUB_OFFLINE=1),
downloaded when online. Offline and not cached is one error line naming the id.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..runs.files import read_json_object

MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# what a model directory needs (tokenizer files come along so that a downloaded model also has its tokenizer)
FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "generation_config.json"]


def resolve(path: str | os.PathLike, caller: str = "from_pretrained") -> Path:
    """The local directory for path: the path itself, or the cached snapshot of a Hub model id."""
    local = Path(path)
    if local.exists() or not MODEL_ID.fullmatch(str(path)):
        if not local.is_dir():
            raise FileNotFoundError(f"{caller}: {path} is not a directory (expected a model directory or a "
                                    f"Hugging Face model id 'org/name')")
        return local
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{caller}: {path} is not a directory, and huggingface_hub (to look it up as a "
                                f"model id) is not installed") from None
    try:
        return Path(snapshot_download(str(path), allow_patterns=FILES))
    except Exception as e:  # the Hub's errors (offline, not found, gated, network): one line naming the id
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"{caller}: {path} is neither a directory nor a model huggingface_hub can "
                                f"provide ({type(e).__name__}: {first})") from None


def read_config(path: str | os.PathLike, caller: str = "from_pretrained") -> tuple[Path, dict]:
    """(the resolved directory, its config.json as a dict), with one error line for a missing or broken file."""
    path = resolve(path, caller)
    return path, read_json_object(path / "config.json", caller)
