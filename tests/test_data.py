"""Data: tokenizers round-trip, the stdlib corpus, the Yoda instruction task, loss masking."""
import json

import pytest
import torch

from minilora.data import (IGNORE, BPETokenizer, ByteTokenizer, Example, InstructionSet, TokenStream,
                           english_documents, encode_example, load_jsonl, load_tokenizer, prompt, save_jsonl,
                           split_documents, split_examples, yoda, yoda_dataset)

TEXT = ("The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.\n"
        "Functions return values. A function may return None. Ünïcödé ✓ stays intact.\n") * 20


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids + [tok.eos_id]) == TEXT
    assert tok.vocab_size == 257 and tok.eos_id == 256
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


def test_bpe_learns_merges_compresses_and_round_trips(tmp_path):
    tok = BPETokenizer.train(TEXT, 300)
    assert tok.vocab_size == 300 and tok.eos_id == 299 and len(tok.merges) == 43
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode()) / 1.8  # frequent words became fewer tokens
    assert " the" in {tok.decode([i]) for i in ids}
    # the first merge is the most frequent adjacent byte pair in the word counts
    assert BPETokenizer.train(TEXT, 300).merges == tok.merges  # deterministic
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, BPETokenizer) and again.merges == tok.merges
    assert again.encode("brand new words: zebra") != [] and again.decode(again.encode("zebra ✓")) == "zebra ✓"
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(TEXT, 100)


def test_bpe_first_merge_is_most_frequent_pair():
    text = "aaab aaab aaab cd"
    tok = BPETokenizer.train(text, 258)
    # word types: "aaab" x1, " aaab" x2, " cd" x1 -> pair (a, a) occurs 2 + 2·2 = 6 times, more than any other
    assert tok.merges == [(ord("a"), ord("a"))]


def test_hf_tokenizer_json_from_a_local_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers package reads tokenizer.json")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert type(tok).__name__ == "HFTokenizer"
    assert tok.eos_id == hf.token_to_id("<|endoftext|>")
    assert tok.decode(tok.encode(TEXT[:200]) + [tok.eos_id]) == TEXT[:200]


def test_load_tokenizer_defaults_and_errors(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "minilora_tokenizer.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path)


def test_stdlib_corpus_is_real_english_and_splits_cleanly():
    topics = english_documents(("topics",))
    text = "\n".join(topics)
    assert len(text) > 100_000
    assert text.count(" the ") > 1000 and "statement" in text
    train, val = split_documents(topics, 0.1)
    n_val = len(topics) // 10
    assert len(train) + len(val) == sum(map(len, topics)) + 2 * (len(topics) - n_val - 1) + 2 * (n_val - 1)
    assert topics[9] in val and topics[9] not in train and topics[0] in train
    with pytest.raises(ValueError, match="sources"):
        english_documents(("wikipedia",))
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(topics, 0.7)


@pytest.mark.parametrize("plain, jedi", [
    ("You must learn patience.", "Learn patience, you must."),
    ("The young pilot cannot repair the broken ship.", "Repair the broken ship, the young pilot cannot."),
    ("Guido will find an old map.", "Find an old map, Guido will."),
    ("The function should return a new list.", "Return a new list, the function should."),
    ("I may face my fear.", "Face my fear, I may."),
])
def test_yoda_rewrite(plain, jedi):
    assert yoda(plain) == jedi


def test_yoda_rejects_other_sentences():
    with pytest.raises(ValueError, match="end with"):
        yoda("You must learn patience")
    with pytest.raises(ValueError, match="Subject modal verb"):
        yoda("Patience is a virtue.")


def test_yoda_dataset_is_deterministic_disjoint_and_consistent():
    train, val = yoda_dataset(300, 50, seed=3)
    assert (train, val) == yoda_dataset(300, 50, seed=3)
    assert yoda_dataset(300, 50, seed=4)[0] != train
    assert len(train) == 300 and len(val) == 50
    assert not {e.context for e in train} & {e.context for e in val}
    for e in train + val:
        assert e.output == yoda(e.context) and e.instruction


def test_jsonl_round_trip_and_errors(tmp_path):
    train, _ = yoda_dataset(20, 1)
    save_jsonl(train, tmp_path / "d.jsonl")
    assert load_jsonl(tmp_path / "d.jsonl") == train
    (tmp_path / "alpaca.jsonl").write_text('{"instruction": "Add", "input": "2 + 2", "output": "4"}\n')
    assert load_jsonl(tmp_path / "alpaca.jsonl") == [Example("Add", "2 + 2", "4")]
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_jsonl(tmp_path / "bad.jsonl")
    a, b = split_examples(train, 0.25, seed=0)
    assert len(b) == 5 and sorted(map(str, a + b)) == sorted(map(str, train))


def test_instruction_batches_mask_everything_but_the_response():
    tok = ByteTokenizer()
    ex = [Example("Say it like Yoda.", "You must learn patience.", "Learn patience, you must."),
          Example("Talk like Yoda.", "I may rest.", "Rest, I may.")]
    data = InstructionSet(ex, tok, block_size=128)
    x, y = data.collate([0, 1])
    for row, e in enumerate(ex):
        ids, n_prompt = encode_example(tok, e)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        assert (y[row, :n_prompt - 1] == IGNORE).all() and (y[row, n:] == IGNORE).all()
        answer = y[row, n_prompt - 1:n].tolist()
        assert tok.decode(answer) == e.output and answer[-1] == tok.eos_id
    assert prompt("a", "b").endswith("Response:\n")
    with pytest.raises(ValueError, match="block_size"):
        InstructionSet(ex, tok, block_size=40)


def test_token_stream_windows_shift_by_one():
    data = TokenStream(list(range(100)), block_size=10)
    g = torch.Generator().manual_seed(0)
    x, y = data.sample(4, g)
    assert x.shape == (4, 10) and torch.equal(y, x + 1)
    batches = list(data.batches(4))
    assert sum(len(b[0]) for b in batches) == 9 and torch.equal(batches[0][1], batches[0][0] + 1)
    with pytest.raises(ValueError, match="block_size"):
        TokenStream([1, 2, 3], block_size=3)


@pytest.mark.parametrize("line, key", [
    ('{"instruction": null, "context": "a", "output": "b"}', "'instruction'"),
    ('{"instruction": "x", "output": 5}', "'output'"),
    ('{"instruction": "x", "input": ["a"], "output": "y"}', "'input'"),
    ('{"instruction": "x", "context": false, "output": "y"}', "'context'"),
    ('{"instruction": "x"}', "'output' is missing"),
    ('[1, 2]', "expected a JSON object"),
])
def test_jsonl_refuses_values_that_are_not_strings(tmp_path, line, key):
    """A null or a number is refused naming file, line and key, not trained as the string "None" or "5"."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*{key}"):
        load_jsonl(path)
    with pytest.raises(TypeError, match="Example.output must be a str"):
        Example("a", "b", 5)


def test_jsonl_that_is_not_utf8_or_not_a_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "x", "output": "y"}\n{"instruction": "caf\xe9", "output": "y"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 .*0xe9 at column 21"):
        load_jsonl(path)
    with pytest.raises(ValueError, match="is a directory"):
        load_jsonl(tmp_path)
    path.write_bytes(b'\xef\xbb\xbf{"instruction": "x", "output": "y"}\n')  # UTF-8 with a byte-order mark
    assert load_jsonl(path) == [Example("x", "", "y")]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name, text, needle", [
    ("minilora_tokenizer.json", "garbage!!", "not valid JSON"),
    ("minilora_tokenizer.json", '{"type": "bpe", "vocab_size": 300, "merges": [[104, 101], [32', "not valid JSON"),
    ("minilora_tokenizer.json", '{"type": "bpe", "vocab_size": 300}', "needs 'merges'.*is missing"),
    ("minilora_tokenizer.json", '{"type": "bpe", "merges": {"a": 1}}', "needs 'merges'.*is a dict"),
    ("minilora_tokenizer.json", '{"type": "bpe", "merges": [[104, "e"]]}', "merge 0 must be a pair"),
    ("minilora_tokenizer.json", '{"type": "bpe", "merges": [[104, 999]]}', "refers to an id"),
    ("minilora_tokenizer.json", '{"type": "bpe", "vocab_size": 300, "merges": [[104, 101]]}', "vocab_size is 300, but the tokenizer it describes has vocab_size 258"),
    ("minilora_tokenizer.json", '[1]', "expected a JSON object"),
    ("tokenizer.json", "garbage", "not valid JSON"),
    ("tokenizer.json", '{"version": "1.0", "model": {', "not valid JSON"),
    ("tokenizer.json", '{"version": "1.0"}', "not a valid Hugging Face tokenizer.json"),
])
def test_damaged_tokenizer_files_are_refused_naming_the_file(tmp_path, name, text, needle):
    if name == "tokenizer.json":
        pytest.importorskip("tokenizers")
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=needle) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / name) in str(e.value)
    (tmp_path / name).write_bytes(b'{"type": "b\xffpe"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_tokenizer(tmp_path)
