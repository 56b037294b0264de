"""An instruction dataset in the lecture's shape, (instruction, context, output), made by code from a seed.

The task: rewrite a plain English sentence the way Yoda speaks. Every context sentence has the shape
    Subject  modal  verb  object.          "The function must return a new list."
and its Yoda form moves the verb phrase to the front and the subject and modal to the end:
    Verb object, subject modal.            "Return a new list, the function must."
The rewrite is a deterministic function of the sentence (`yoda`), so the metric is exact match of the
model's greedy answer against it. A base model trained only on English prose never produces this word
order (it scores ~0); a fine-tuned one should score high on held-out sentences it has never seen.
"""
from __future__ import annotations

import json
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..runs.files import atomic_write_text

# The words come from the pretraining corpus (Python's documentation), so the base model knows them all:
# fine-tuning has to teach a new word order, not new words.
NAMES = ["Python", "Guido", "Ada", "Yoda"]
SUBJECTS = ["You", "We", "They", "I", "It", "The function", "The module", "The caller", "This method",
            "The interpreter", "Every object", "The class", "Your program", "The user", *NAMES]
MODALS = ["must", "will", "can", "should", "may", "cannot", "could"]
VERBS = ["return", "raise", "call", "define", "import", "create", "open", "close", "read", "write", "use",
         "find", "change", "pass", "store", "check", "compare", "copy", "print", "test"]
DETERMINERS = ["the", "a", "this", "that", "every", "your", "its"]
ADJECTIVES = ["", "new", "old", "empty", "other", "same", "first", "last", "default", "given", "small", "large"]
NOUNS = ["value", "object", "list", "string", "file", "name", "module", "class", "method", "attribute",
         "exception", "error", "function", "number", "key", "result", "argument", "line", "type", "item"]
ABSTRACT = ["the Force", "patience", "your fear", "the future", "the dark side", "balance", "peace"]
INSTRUCTIONS = ["Say it like Yoda.", "Talk like Yoda.", "Speak as a Jedi master."]

TEMPLATE = "Instruction: {instruction}\nContext: {context}\nResponse:\n"


@dataclass(frozen=True)
class Example:
    instruction: str
    context: str
    output: str
    source: str = field(default="", compare=False)  # where it was read ("file.jsonl:7"), for error messages

    def __post_init__(self):
        for name in ("instruction", "context", "output"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Example.{name} must be a str, got {type(getattr(self, name)).__name__}")


def prompt(instruction: str, context: str = "") -> str:
    """The text the model sees before it answers (the answer follows, then the end-of-text token)."""
    return TEMPLATE.format(instruction=instruction, context=context)


def yoda(sentence: str) -> str:
    """"S m v O." -> "V O, s m.": the subject and modal move behind the verb phrase (Yoda's OSV-like order).

    The subject keeps its capital only if it is a name or "I"; the verb phrase gets one."""
    if not sentence.endswith("."):
        raise ValueError(f"sentence must end with '.', got {sentence!r}")
    words = sentence[:-1].split(" ")
    k = next((i for i, w in enumerate(words) if w in MODALS), None)
    if k is None or k == 0 or k + 1 >= len(words):
        raise ValueError(f"sentence must look like 'Subject modal verb object.', got {sentence!r}")
    subject, modal, phrase = " ".join(words[:k]), words[k], " ".join(words[k + 1:])
    if subject.split(" ")[0] not in ("I", *NAMES):
        subject = subject[0].lower() + subject[1:]
    return f"{phrase[0].upper()}{phrase[1:]}, {subject} {modal}."


def _object(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(ABSTRACT)
    det, adj, noun = rng.choice(DETERMINERS), rng.choice(ADJECTIVES), rng.choice(NOUNS)
    words = [w for w in (adj, noun) if w]
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return " ".join([det] + words)


def random_sentence(rng: random.Random) -> str:
    """One plain sentence "Subject modal verb object." drawn from the word lists."""
    return f"{rng.choice(SUBJECTS)} {rng.choice(MODALS)} {rng.choice(VERBS)} {_object(rng)}."


def yoda_dataset(n_train: int = 2000, n_val: int = 200, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, validation): distinct sentences, so no validation context appears in training."""
    for name, n in (("n_train", n_train), ("n_val", n_val)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < n_train + n_val:
        seen.setdefault(random_sentence(rng), None)
    examples = [Example(rng.choice(INSTRUCTIONS), s, yoda(s)) for s in seen]
    return examples[:n_train], examples[n_train:]


def save_jsonl(examples: list[Example], path: str | os.PathLike) -> None:
    """One {"instruction", "context", "output"} object per line, written atomically."""
    atomic_write_text(path, "".join(json.dumps({"instruction": e.instruction, "context": e.context,
                                                "output": e.output}) + "\n" for e in examples))


def _example(rec, where: str) -> Example:
    """One JSONL record -> Example; every field must be a string ("input" stands for "context", as in Alpaca)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    fields = {"instruction": rec.get("instruction"), "output": rec.get("output")}
    key = "context" if "context" in rec else "input"
    fields["context"] = rec.get(key, "")
    for name, value in fields.items():
        shown = key if name == "context" else name
        if name != "context" and shown not in rec:
            raise ValueError(f"{where}: the key {shown!r} is missing (each line needs 'instruction' and 'output')")
        if not isinstance(value, str):
            raise ValueError(f"{where}: {shown!r} must be a string, got {json.dumps(value)[:40]}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800" escape: half of a UTF-16 pair, not a character
            raise ValueError(f"{where}: {shown!r} holds a lone surrogate (U+{ord(value[e.start]):04X} at character "
                             f"{e.start + 1}), which is not text; it cannot be tokenized") from None
    return Example(fields["instruction"], fields["context"], fields["output"], source=where)


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read instruction/context/output records, one JSON object per line, all three values strings ("input"
    is accepted for "context", as in Alpaca). A bad line is refused naming the file, the line and the key."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a JSONL file (one JSON object per line)")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (expected a JSONL file)")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):  # a pipe, a terminal or a device: read once at most, and never the same twice
        kind = next((k for test, k in ((stat.S_ISFIFO, "a pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                                        (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device")) if test(mode)),
                    "not a regular file")
        raise ValueError(f"{path} is {kind}, not a regular file; save the data to a JSONL file and give its path")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(_example(rec, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def split_examples(examples: list[Example], val_fraction: float = 0.1, seed: int = 0, n_train: int | None = None,
                   n_val: int | None = None) -> tuple[list[Example], list[Example]]:
    """Shuffle with a seed, then cut off the last val_fraction (or n_val examples) as validation; n_train keeps
    only that many of the rest for training. Too few examples are refused naming the file they came from."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for name, n in (("n_train", n_train), ("n_val", n_val)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {n!r}")
    held = max(1, round(len(examples) * val_fraction)) if n_val is None else n_val
    need = held + (n_train or 1)
    if len(examples) < need:
        where = examples[0].source.rpartition(":")[0] if examples and examples[0].source else "the data"
        asked = f"{n_train} for training + {held} for validation" if n_train else f"{held} for validation + 1 to train"
        raise ValueError(f"{where} holds {len(examples)} example(s); the split needs {need} ({asked})")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    train = shuffled[:-held]
    return train[:n_train] if n_train else train, shuffled[-held:]
