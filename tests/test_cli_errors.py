"""Bad input to python -m minilora ends in one line `error: ...` naming what is wrong, exit status 2, no
traceback, and before any work is done. The models here are built in a second (no pretraining)."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import minilora.__main__ as cli
from minilora import GPT, GPTConfig, add_lora, save_adapter
from minilora.data import BPETokenizer, Example, save_jsonl, yoda

TEXT = "You must learn patience. Learn patience, you must. The function should return a new list. " * 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny GPT (block_size 256) with a small BPE beside it, as pretrain would leave it."""
    out = tmp_path_factory.mktemp("base")
    tok = BPETokenizer.train(TEXT, 280)
    torch.manual_seed(0)
    GPT(GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)).save_pretrained(out)
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(add_lora(GPT.from_pretrained(base), ["c_attn", "lm_head"], r=2), out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "good.jsonl"
    save_jsonl([Example("Yoda", s, yoda(s)) for s in ["You must rest.", "We can win.", "I will go."]] * 4, path)
    return path


def run(argv):
    """main(argv) -> (exit status, stdout, stderr); argparse's exit counts as a return."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def one_error(capsys, argv, *needles):
    """Assert main(argv) exits 2 with one `error:` line holding every needle; return that line."""
    rc = run(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def finetune(base, out, *extra):
    return ["finetune", "--base", base, "--out", out, "--no-progress", "--steps", "2", "--n-train", "8",
            "--n-val", "2", "--batch-size", "2", *extra]


def with_data(base, out, path, *extra):
    """finetune on the JSONL file `path`, --n-train / --n-val only as `extra` gives them."""
    return ["finetune", "--base", base, "--out", out, "--no-progress", "--steps", "2", "--batch-size", "2",
            "--data", path, *extra]


def copy_base(base, to: Path) -> Path:
    to.mkdir()
    for name in ("config.json", "model.safetensors"):
        (to / name).write_bytes((base / name).read_bytes())
    return to


# ----- arguments -----

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a PyTorch without a CUDA device")
def test_device_cuda_without_cuda(base, tmp_path, capsys):
    one_error(capsys, finetune(base, tmp_path / "o", "--device", "cuda"), "--device", "sees 0 CUDA device(s)", "got 'cuda'")


def test_device_that_does_not_exist(base, tmp_path, capsys):
    one_error(capsys, finetune(base, tmp_path / "o", "--device", "banana"), "--device", "got 'banana'",
              "expected cpu, cuda")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--alpha", "nan"), ("--lr", "-1"),
                                         ("--dropout", "1.5"), ("--alpha", "0")])
def test_non_finite_or_out_of_range_numbers(base, tmp_path, capsys, flag, value):
    one_error(capsys, finetune(base, tmp_path / "o", flag, value), flag, repr(value), "expected a finite number")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("optimizer", ["paged", "adamw8bit", "paged8bit"])
def test_fsdp_shards_adamw_only(base, tmp_path, capsys, optimizer):
    one_error(capsys, finetune(base, tmp_path / "o", "--fsdp", "--optimizer", optimizer), "fsdp", "'adamw'",
              repr(optimizer))


def test_temperature_nan(base, capsys):
    one_error(capsys, ["generate", "--model", base, "--temperature", "nan"], "--temperature", "'nan'")


# ----- where the run writes -----

@pytest.mark.parametrize("out", ["/dev/null", "{file}", "{file}/sub"])
def test_out_that_is_not_a_directory_fails_before_any_work(tmp_path, capsys, out):
    """--out is checked first: the (missing) base model is never read, nothing is trained."""
    (tmp_path / "file").write_text("mine")
    out = out.replace("{file}", str(tmp_path / "file"))
    err = one_error(capsys, finetune("/nonexistent/base", out), out)
    assert "/nonexistent/base" not in err
    assert (tmp_path / "file").read_text() == "mine"


def test_pretrain_out_dev_null_fails_before_the_tokenizer_is_trained(capsys, monkeypatch):
    monkeypatch.setattr(cli, "pretrain_base", lambda *a, **k: pytest.fail("pretrain_base was called"))
    one_error(capsys, ["pretrain", "--out", "/dev/null", "--steps", "1", "--no-progress"], "/dev/null")


def test_out_holding_other_files_needs_overwrite(base, data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    one_error(capsys, finetune(base, out, "--data", data), str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert run(finetune(base, out, "--data", data, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("command", ["pretrain", "demo"])
def test_overwrite_reaches_the_library(tmp_path, monkeypatch, capsys, command):
    """--overwrite is passed on (the library's own tests check what it does); nothing is trained here."""
    seen = {}

    def pretrain_base(cfg, out, overwrite=False):
        seen.update(overwrite=overwrite)
        return SimpleNamespace(seconds=0.0, final={"loss": 1.0})
    monkeypatch.setattr(cli, "pretrain_base", pretrain_base)
    monkeypatch.setattr(cli, "run_demo", lambda cfg: seen.update(overwrite=cfg.overwrite))
    monkeypatch.setattr(cli, "print_report", lambda summary: None)
    for flag, expected in (([], False), (["--overwrite"], True)):
        assert run([command, "--out", tmp_path / "x", *flag]) == 0
        assert seen.pop("overwrite") is expected


# ----- data -----

def test_data_that_is_a_directory(base, tmp_path, capsys):
    one_error(capsys, finetune(base, tmp_path / "o", "--data", tmp_path), str(tmp_path), "is a directory")


def test_data_that_is_not_utf8(base, tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "x", "output": "y"}\n{"instruction": "caf\xe9", "output": "y"}\n')
    one_error(capsys, finetune(base, tmp_path / "o", "--data", path), f"{path}:2", "not UTF-8")


@pytest.mark.parametrize("record, key", [({"instruction": None, "context": "a", "output": "b"}, "'instruction'"),
                                         ({"instruction": "a", "context": "b", "output": 5}, "'output'")])
def test_data_values_that_are_not_strings(base, tmp_path, capsys, record, key):
    """Refused, naming file, line and key, instead of training on the strings "None" and "5"."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + json.dumps(record) + "\n")
    one_error(capsys, finetune(base, tmp_path / "o", "--data", path), f"{path}:2", key, "must be a string")
    assert not (tmp_path / "o" / "checkpoint").exists()


@pytest.mark.parametrize("lines, needle", [
    (['{"instruction": "a", "output": "b"}'] * 3 + ['{"instruction": "a\\ud800", "output": "b"}'],
     ":4: 'instruction' holds a lone surrogate"),
    (['{"instruction": "a", "output": "b"}'] * 3 + [json.dumps({"instruction": "patience " * 300, "output": "b"})],
     ":4: the example has"),
    (['{"instruction": "a", "output": "b"}'], " holds 1 example(s); the split needs 2"),
])
def test_data_errors_name_the_file_and_line(base, tmp_path, capsys, lines, needle):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    one_error(capsys, with_data(base, tmp_path / "o", path), f"{path}{needle}")
    assert not (tmp_path / "o").exists()


def test_data_that_is_a_pipe_or_a_device(base, tmp_path, capsys):
    """Not 'not found': what the path is, and what to give instead (a pipe is never opened here)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_error(capsys, finetune(base, tmp_path / "o", "--data", fifo), f"{fifo} is a pipe (FIFO), not a regular file")
    one_error(capsys, finetune(base, tmp_path / "o", "--data", "/dev/null"), "/dev/null is a character device")


def test_n_train_and_n_val_with_data_are_honoured(base, data, tmp_path, capsys, monkeypatch):
    """--data with --n-train / --n-val: n_val examples held out, n_train of the rest trained on; too few: refused."""
    seen = {}

    def fake_train(model, cfg, train_set, val_set, resume=False):
        seen.update(train=len(train_set), val=len(val_set))
        return SimpleNamespace(params="", losses=[1.0], final={"loss": 1.0, "exact_match": 0.0})
    monkeypatch.setattr(cli, "train", fake_train)
    for extra, expected in ((["--n-train", "5", "--n-val", "3"], (5, 3)), (["--n-val", "4"], (8, 4)),
                            (["--n-train", "2"], (2, 1)), ([], (11, 1))):
        assert run(with_data(base, tmp_path / "o", data, *extra)) == 0, capsys.readouterr()
        assert (seen["train"], seen["val"]) == expected, extra
    one_error(capsys, finetune(base, tmp_path / "o", "--data", data, "--n-train", "11", "--n-val", "2"),
              f"{data} holds 12 example(s); the split needs 13 (11 for training + 2 for validation)")


def poisoned(base, to: Path) -> Path:
    copy_base(base, to)
    (to / "minilora_tokenizer.json").write_bytes((base / "minilora_tokenizer.json").read_bytes())
    model = GPT.from_pretrained(to)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[0, 1] = float("inf")
    model.save_pretrained(to)
    return to


def test_refusals_come_before_the_run_directory(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    one_error(capsys, finetune(base, out, "--r", "100"), "r (LoRA rank) = 100", "'transformer.h.0.attn.c_attn'",
              "choose r <= 32")
    err = one_error(capsys, finetune(base, out, "--lr", "1e308"), "--lr=1e+308 is too large")
    assert "TrainConfig" not in err  # the flag the user typed, not the library's name for it
    bad = poisoned(base, tmp_path / "inf")
    one_error(capsys, finetune(bad, out), f"the base model {bad} holds inf/NaN weights",
              "transformer.h.0.attn.c_attn.weight has 1 non-finite value(s)")
    monkeypatch.setattr("minilora.runs.preflight.world_size", lambda: 3)  # as under torchrun with 3 processes
    monkeypatch.setattr(cli, "load_jsonl", lambda *a: pytest.fail("the data was read"))
    one_error(capsys, finetune(base, out, "--batch-size", "2"), "batch_size=2 (--batch-size) is smaller than the 3")
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [(["--n-embd", "30", "--n-head", "4"], "n_embd (30) must be divisible"),
                                          (["--lr", "1e308"], "--lr=1e+308 is too large"),
                                          (["--vocab-size", "256"], "--vocab-size")])
def test_pretrain_refuses_before_the_tokenizer_is_trained(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setattr(cli, "pretrain_base", lambda *a, **k: pytest.fail("pretrain_base was called"))
    one_error(capsys, ["pretrain", "--out", tmp_path / "o", *argv], needle)
    assert not (tmp_path / "o").exists()


def test_pretrain_vocab_the_corpus_cannot_fill(tmp_path, capsys, monkeypatch):
    """--vocab-size 100000000 gave a 12,436-token vocabulary without a word; now it says what the text yields."""
    import minilora.demos.finetune as demo
    monkeypatch.setattr(demo, "english_documents", lambda: [TEXT] * 40)
    err = one_error(capsys, ["pretrain", "--out", tmp_path / "o", "--vocab-size", "100000000", "--no-progress"],
                    "vocab_size=100000000 cannot be reached: this text yields at most")
    most = int(err.split("at most ")[1].split()[0])
    assert 257 < most < 1000


def test_generate_at_a_vanishing_temperature_is_greedy(base, capsys):
    args = ["generate", "--model", base, "--prompt", "You must", "--max-new-tokens", "8"]
    assert run(args) == 0
    greedy = capsys.readouterr().out
    assert run(args + ["--temperature", "1e-300", "--seed", "3"]) == 0
    assert capsys.readouterr().out == greedy


# ----- model directories -----

@pytest.mark.parametrize("name, text, needle", [
    ("minilora_tokenizer.json", "garbage!!", "not valid JSON"),
    ("minilora_tokenizer.json", '{"type": "bpe", "vocab_size": 280, "merges": [[32, 1', "not valid JSON"),
    ("minilora_tokenizer.json", '{"type": "bpe", "vocab_size": 280}', "needs 'merges'"),
    ("tokenizer.json", "garbage", "not valid JSON"),
    ("tokenizer.json", '{"version": "1.0", "model": {', "not valid JSON"),
])
def test_damaged_tokenizer(base, tmp_path, capsys, name, text, needle):
    if name == "tokenizer.json":
        pytest.importorskip("tokenizers")
    model = copy_base(base, tmp_path / "model")
    (model / name).write_text(text)
    one_error(capsys, ["generate", "--model", model], model / name, needle)
    one_error(capsys, finetune(model, tmp_path / "o"), model / name, needle)


@pytest.mark.parametrize("config, needle", [("[1]", "must hold a JSON object"), (None, "'target_modules'"),
                                            ('{"r": 2, "lora_al', "not valid JSON")])
def test_damaged_adapter_config(base, adapter, tmp_path, capsys, config, needle):
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    good = json.loads((adapter / "adapter_config.json").read_text())
    good.pop("target_modules")
    (bad / "adapter_config.json").write_text(json.dumps(good) if config is None else config)
    for qlora in ([], ["--qlora"]):
        one_error(capsys, ["generate", "--model", base, "--adapter", bad, *qlora], bad / "adapter_config.json",
                  needle)


def test_qlora_with_nothing_to_quantize(base, tmp_path, capsys):
    """The tied lm_head is the embedding matrix: it stays in full precision, so nothing would be NF4."""
    one_error(capsys, finetune(base, tmp_path / "o", "--mode", "qlora", "--targets", "lm_head"),
              "lm_head", "quantize")
    lm_head_only = tmp_path / "adapter"
    save_adapter(add_lora(GPT.from_pretrained(base), ["lm_head"], r=2), lm_head_only)
    one_error(capsys, ["generate", "--model", base, "--adapter", lm_head_only, "--qlora"], "lm_head", "quantize")


def test_prompt_longer_than_block_size(base, capsys):
    one_error(capsys, ["generate", "--model", base, "--prompt", "patience " * 400], "block_size 256", "prompt")


# ----- what is not bad input keeps its traceback -----

def test_a_bug_is_not_reported_as_bad_input(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")
    monkeypatch.setitem(cli.COMMANDS, "generate", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["generate", "--model", "x"])
