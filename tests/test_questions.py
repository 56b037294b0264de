"""The second instruction task (minilora.data.questions): statements become yes/no questions, on the Yoda task's sentences."""
import pytest

from minilora.data import InstructionSet, ByteTokenizer, yoda_dataset
from minilora.data.questions import question, question_dataset


@pytest.mark.parametrize("plain, asked", [
    ("The function must return a new list.", "Must the function return a new list?"),
    ("I can read the file.", "Can I read the file?"),
    ("Ada will call the Force.", "Will Ada call the Force?"),
    ("Every object cannot close an empty key.", "Cannot every object close an empty key?"),
])
def test_question_rewrite(plain, asked):
    assert question(plain) == asked


@pytest.mark.parametrize("bad", ["You must learn patience", "Patience is a virtue.", "Must you go."])
def test_question_names_the_sentence_it_refuses(bad):
    with pytest.raises(ValueError, match="sentence must"):
        question(bad)


def test_question_dataset_has_the_yoda_sentences_and_split():
    train, val = question_dataset(300, 50, seed=3)
    y_train, y_val = yoda_dataset(300, 50, seed=3)
    assert [e.context for e in train] == [e.context for e in y_train]
    assert [e.context for e in val] == [e.context for e in y_val]
    assert all(e.output == question(e.context) and e.output != y.output for e, y in zip(train + val, y_train + y_val))
    assert {e.instruction for e in train}.isdisjoint({e.instruction for e in y_train})
    assert (train, val) == question_dataset(300, 50, seed=3)
    InstructionSet(val, ByteTokenizer(), 256)  # every example encodes
