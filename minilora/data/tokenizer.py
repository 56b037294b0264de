"""Tokenizers: text -> token ids -> text.

ByteTokenizer is the one that needs nothing: every UTF-8 byte is a token (ids 0..255) and one extra id
(256) marks the end of a text, as GPT-2's <|endoftext|> does. Any string round-trips exactly.

BPETokenizer is byte-pair encoding as GPT-2 does it, trained here from scratch: split text into words
(a leading space stays with its word), start from the 256 bytes, and repeatedly merge the most frequent
adjacent pair of symbols into a new one (Sennrich et al. 2016). Its ids are 0..255 for the bytes,
256.. for the merges in the order they were learned, and the last id for end-of-text. Every string still
round-trips exactly (the symbols are byte strings), but English costs ~4x fewer tokens than bytes.

HFTokenizer reads a Hugging Face `tokenizer.json` (GPT-2's byte-level BPE, say) from a local directory
through the `tokenizers` package, which ships with transformers. Nothing is downloaded.
"""
from __future__ import annotations

import heapq
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Protocol

from ..runs.files import atomic_write, atomic_write_text

MINILORA_TOKENIZER = "minilora_tokenizer.json"  # how a model directory names its byte tokenizer
EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, directory: str | os.PathLike) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte value (0..255); eos_id = 256; vocab_size = 257."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; the end-of-text id is dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_text(Path(directory) / MINILORA_TOKENIZER,
                          json.dumps({"type": "bytes", "vocab_size": self.vocab_size, "eos_id": self.eos_id}))

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


# GPT-2's word split, restricted to ASCII letters and digits (everything else still splits safely).
WORD_SPLIT = re.compile(r"""'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


class BPETokenizer:
    """Byte-level BPE: ids 0..255 are bytes, 256 + k is the k-th merge, eos_id = 256 + len(merges)."""

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = []
        for k, m in enumerate(merges):
            if not (isinstance(m, (list, tuple)) and len(m) == 2
                    and all(isinstance(i, int) and not isinstance(i, bool) for i in m)):
                raise ValueError(f"merge {k} must be a pair of token ids [a, b], got {m!r}")
            self.merges.append(tuple(m))
        self.vocab: list[bytes] = [bytes([i]) for i in range(256)]
        for k, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + k and 0 <= b < 256 + k):
                raise ValueError(f"merge {k} = {(a, b)} refers to an id that does not exist yet")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.rank = {m: k for k, m in enumerate(self.merges)}
        self.eos_id = 256 + len(self.merges)
        self.vocab_size = self.eos_id + 1
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Learn vocab_size - 257 merges from text: each one fuses the most frequent adjacent pair (ties: the
        smallest pair of ids), counted over word types weighted by their frequency. A vocab_size the text cannot
        fill (no pair left that occurs twice) is refused, saying the most it yields."""
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"vocab_size must be an int >= 257 (256 bytes + end-of-text), got {vocab_size!r}")
        counts = Counter(WORD_SPLIT.findall(text))
        words = [list(w.encode("utf-8")) for w in counts]
        freq = list(counts.values())
        pairs: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i, w in enumerate(words):
            for p in zip(w, w[1:]):
                pairs[p] += freq[i]
                where[p].add(i)
        heap = [(-c, p) for p, c in pairs.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while len(merges) < vocab_size - 257 and heap:
            neg, best = heapq.heappop(heap)
            if pairs.get(best, 0) != -neg:
                continue  # stale heap entry: the count changed since it was pushed
            if -neg < 2:
                break
            new = 256 + len(merges)
            merges.append(best)
            touched: set[tuple[int, int]] = set()
            for i in where.pop(best):
                w, f = words[i], freq[i]
                for p in zip(w, w[1:]):
                    pairs[p] -= f
                    touched.add(p)
                j, out = 0, []
                while j < len(w):
                    if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                        out.append(new)
                        j += 2
                    else:
                        out.append(w[j])
                        j += 1
                words[i] = out
                for p in zip(out, out[1:]):
                    pairs[p] += f
                    where[p].add(i)
                    touched.add(p)
            pairs.pop(best, None)
            for p in touched:
                if pairs.get(p, 0) > 0:
                    heapq.heappush(heap, (-pairs[p], p))
                else:
                    pairs.pop(p, None)
        if len(merges) < vocab_size - 257:  # no pair left that occurs twice: the text yields no more tokens
            raise ValueError(f"vocab_size={vocab_size} cannot be reached: this text yields at most "
                             f"{257 + len(merges)} tokens (256 bytes + end-of-text + {len(merges)} merges of pairs "
                             f"that occur at least twice); choose vocab_size <= {257 + len(merges)}")
        return cls(merges)

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = list(word.encode("utf-8"))
            while len(ids) > 1:  # apply the earliest-learned merge present, until none applies
                p = min(zip(ids, ids[1:]), key=lambda q: self.rank.get(q, len(self.rank)))
                k = self.rank.get(p)
                if k is None:
                    break
                out, j = [], 0
                while j < len(ids):
                    if j + 1 < len(ids) and (ids[j], ids[j + 1]) == p:
                        out.append(256 + k)
                        j += 2
                    else:
                        out.append(ids[j])
                        j += 1
                ids = out
            if len(self._cache) < 100_000:
                self._cache[word] = ids
        return list(ids)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [i for w in WORD_SPLIT.findall(text) for i in self._encode_word(w)]

    def decode(self, ids: list[int]) -> str:
        """Concatenated byte strings of the ids (end-of-text dropped), read as UTF-8."""
        return b"".join(self.vocab[i] for i in ids if 0 <= i < self.eos_id).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_text(Path(directory) / MINILORA_TOKENIZER,
                          json.dumps({"type": "bpe", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                                      "merges": self.merges}))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face tokenizer.json (e.g. GPT-2's BPE, 50257 ids, <|endoftext|> = 50256), read locally."""

    def __init__(self, directory: str | os.PathLike):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as e:  # pragma: no cover - tokenizers comes with transformers
            raise ImportError("HFTokenizer needs the `tokenizers` package (pip install tokenizers)") from e
        self.path = Path(directory) / "tokenizer.json"
        if not self.path.is_file():
            raise FileNotFoundError(f"HFTokenizer: {self.path} not found")
        read_json(self.path)  # a precise message for a file that is not JSON at all
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as e:  # the tokenizers package raises a bare Exception for a malformed file
            raise ValueError(f"{self.path}: not a valid Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._tok.token_to_id(EOT)
        if eos is None:
            raise ValueError(f"HFTokenizer: {self.path} has no {EOT!r} token to end texts with")
        self.eos_id = eos

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i != self.eos_id], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        dst = Path(directory) / "tokenizer.json"
        if dst.resolve() != self.path.resolve():
            atomic_write(dst, self.path.read_bytes())

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def read_json(path: Path):
    """The JSON value in the file at path; a file that is not UTF-8 JSON is refused naming it."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         f"the file may be truncated or damaged") from None


def _from_meta(meta: Path) -> Tokenizer:
    """The tokenizer a minilora_tokenizer.json describes: {"type": "bytes"} or {"type": "bpe", "merges": [...]}."""
    info = read_json(meta)
    if not isinstance(info, dict):
        raise ValueError(f"{meta}: expected a JSON object with a 'type', got {type(info).__name__}")
    kind = info.get("type")
    if kind == "bytes":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "bpe":
        if not isinstance(info.get("merges"), list):
            what = "is missing" if "merges" not in info else f"is a {type(info['merges']).__name__}"
            raise ValueError(f"{meta}: a 'bpe' tokenizer needs 'merges', a list of [a, b] token id pairs; "
                             f"the key {what}")
        try:
            tok = BPETokenizer(info["merges"])
        except ValueError as e:
            raise ValueError(f"{meta}: {e}") from None
    else:
        raise ValueError(f"{meta}: unknown tokenizer type {kind!r} (expected 'bpe' or 'bytes')")
    for key in ("vocab_size", "eos_id"):  # written by save(): a mismatch means the file was altered
        if key in info and info[key] != getattr(tok, key):
            raise ValueError(f"{meta}: {key} is {info[key]!r}, but the tokenizer it describes has "
                             f"{key} {getattr(tok, key)}")
    return tok


def load_tokenizer(directory: str | os.PathLike | None = None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer a directory holds: tokenizer.json -> HFTokenizer; minilora_tokenizer.json -> BPE or bytes;
    nothing (or directory None) -> ByteTokenizer. A damaged file is refused naming it and what is wrong.
    With vocab_size (the model's), a tokenizer whose ids the model cannot embed is refused too."""
    if directory is None:
        return ByteTokenizer()
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    meta = directory / MINILORA_TOKENIZER
    if (directory / "tokenizer.json").is_file():
        tok: Tokenizer = HFTokenizer(directory)
    else:
        tok = _from_meta(meta) if meta.is_file() else ByteTokenizer()
    if vocab_size is not None:
        if not (directory / "tokenizer.json").is_file() and not meta.is_file() and vocab_size != tok.vocab_size:
            raise ValueError(f"{directory} holds no tokenizer (tokenizer.json or {MINILORA_TOKENIZER}) for its "
                             f"vocabulary of {vocab_size}")
        if tok.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer in {directory} has {tok.vocab_size} ids, the model only {vocab_size}")
    return tok
