"""A second instruction task on the Yoda task's sentences: turn the statement into a yes/no question.

    "The function must return a new list."   ->   "Must the function return a new list?"

The modal moves to the front (with the capital), the subject follows (losing its capital unless it is a name
or "I"), the full stop becomes a question mark. Like `yoda`, the rewrite is a deterministic function of the
sentence, so the metric is exact match; and because `question_dataset(seed)` draws the same sentences as
`yoda_dataset(seed)`, two adapters trained on the two tasks see the same English and differ only in what
they do with it (notebook 09 serves both from one base in one batch).
"""
from __future__ import annotations

from .instructions import Example, yoda, yoda_dataset

QUESTION_INSTRUCTIONS = ["Ask it as a question.", "Turn it into a question.", "Make it a yes/no question."]


def question(sentence: str) -> str:
    """"S m v O." -> "M s v O?": the modal goes first, the subject after it.

    yoda() already splits the sentence and checks its shape ("V O, s m.", the subject's capital settled), so the
    question is its parts in another order."""
    phrase, rest = yoda(sentence)[:-1].rsplit(", ", 1)
    subject, modal = rest.rsplit(" ", 1)
    return f"{modal[0].upper()}{modal[1:]} {subject} {phrase[0].lower()}{phrase[1:]}?"


def question_dataset(n_train: int = 2000, n_val: int = 200, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, validation): yoda_dataset's sentences in the same order, each with a question instruction
    (drawn from the example's index, so the split and the sentences are exactly the Yoda task's)."""
    train, val = yoda_dataset(n_train, n_val, seed)
    ask = lambda i, e: Example(QUESTION_INSTRUCTIONS[i % len(QUESTION_INSTRUCTIONS)], e.context, question(e.context))
    return [ask(i, e) for i, e in enumerate(train)], [ask(i, e) for i, e in enumerate(val)]
