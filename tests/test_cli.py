"""python -m minilora end to end at tiny sizes: pretrain, finetune (and a killed run resumed), generate,
memory, demo; bad arguments give one line, not a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from killing import kill_at_step
from minilora.__main__ import main
from minilora.data import Example, save_jsonl, yoda

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "160"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Pretrained once, into a directory that already holds a user's file: --overwrite writes beside it."""
    out = tmp_path_factory.mktemp("base")
    (out / "notes.txt").write_text("mine")
    assert main(["pretrain", "--out", str(out), "--steps", "30", "--vocab-size", "300", "--no-progress", "--overwrite",
                 *TINY]) == 0
    assert {"config.json", "model.safetensors", "minilora_tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert (out / "notes.txt").read_text() == "mine"
    return out


@pytest.fixture(scope="module")
def repeated_data(tmp_path_factory):
    """Four short examples repeated, so the validation split holds sentences the run also trains on."""
    path = tmp_path_factory.mktemp("data") / "four.jsonl"
    plain = ["You must rest.", "We can win.", "I will go.", "They may sing."]
    save_jsonl([Example("Yoda", s, yoda(s)) for s in plain] * 10, path)
    return path


def finetune_args(base, out, *extra):
    return ["finetune", "--base", str(base), "--out", str(out), "--no-progress", *extra]


def test_finetune_loss_falls_and_metric_rises(base, repeated_data, tmp_path, capsys):
    rc = main(finetune_args(base, tmp_path, "--mode", "full", "--data", str(repeated_data), "--steps", "60",
                            "--batch-size", "8", "--lr", "1e-2", "--eval-every", "20"))
    assert rc == 0
    assert "exact match" in capsys.readouterr().out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert sum(m["losses"][-5:]) < sum(m["losses"][:5]) / 3
    assert m["evals"][0]["exact_match"] < m["evals"][-1]["exact_match"]
    assert m["evals"][-1]["exact_match"] >= 0.5
    assert (tmp_path / "model" / "model.safetensors").is_file()  # full fine-tuning saves the model
    assert main(["generate", "--model", str(tmp_path / "model"), "--instruction", "Yoda",
                 "--context", "We can win."]) == 0
    assert capsys.readouterr().out == "Win, we can.\n"  # a training sentence, memorised


def test_lora_finetune_then_generate_with_the_adapter(base, tmp_path, capsys):
    assert main(finetune_args(base, tmp_path, "--mode", "lora", "--steps", "10", "--n-train", "32",
                              "--n-val", "8", "--r", "4")) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert main(["generate", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                 "--context", "You must learn patience.", "--max-new-tokens", "5"]) == 0
    with_adapter = capsys.readouterr().out
    from minilora import GPT, load_adapter
    from minilora.data import load_tokenizer
    from minilora.generate import respond
    model = load_adapter(GPT.from_pretrained(base), tmp_path / "adapter")
    expected = respond(model, load_tokenizer(base), "Say it like Yoda.", "You must learn patience.", 5)
    assert with_adapter == expected + "\n"


def test_dora_pissa_and_loftq_finetunes_and_two_adapters_in_one_generate(base, tmp_path, capsys):
    small = ["--steps", "4", "--n-train", "16", "--n-val", "4", "--r", "2"]
    runs = {"dora": ["--mode", "lora", "--dora"], "other": ["--mode", "lora", "--dora", "--seed", "1"],
            "pissa": ["--mode", "lora", "--init", "pissa"], "loftq": ["--mode", "qlora", "--init", "loftq",
                                                                      "--loftq-iter", "2"]}
    for name, extra in runs.items():
        assert main(finetune_args(base, tmp_path / name, *small, *extra)) == 0
    capsys.readouterr()
    config = {n: json.loads((tmp_path / n / "adapter" / "adapter_config.json").read_text()) for n in runs}
    assert config["dora"]["use_dora"] is True and config["pissa"]["use_dora"] is False
    assert config["pissa"]["init_lora_weights"] == "pissa" and config["loftq"]["init_lora_weights"] == "loftq"
    assert config["loftq"]["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    ask = ["--context", "You must learn patience.", "--max-new-tokens", "6"]
    alone = {}
    for name in runs:
        assert main(["generate", "--model", str(base), "--adapter", str(tmp_path / name / "adapter"), *ask,
                     *(["--qlora"] if name == "loftq" else [])]) == 0
        alone[name] = capsys.readouterr().out.rstrip("\n")
    assert main(["generate", "--model", str(base), "--adapter", f"dora={tmp_path / 'dora' / 'adapter'}",
                 "--adapter", f"other={tmp_path / 'other' / 'adapter'}", *ask]) == 0
    assert capsys.readouterr().out == f"dora: {alone['dora']}\nother: {alone['other']}\n"  # one mixed batch
    assert main(["generate", "--model", str(base), "--adapter", f"a={tmp_path / 'pissa' / 'adapter'}",
                 "--adapter", f"b={tmp_path / 'dora' / 'adapter'}", *ask]) == 2
    assert "PiSSA adapter changes the base weights" in capsys.readouterr().err


def test_a_killed_finetune_resumes_to_the_same_losses(base, tmp_path):
    args = ["--mode", "lora", "--steps", "60", "--save-every", "5", "--n-train", "32", "--n-val", "4",
            "--dropout", "0.1", "--batch-size", "4"]
    stopped_at = kill_at_step(finetune_args(base, tmp_path / "killed", *args), tmp_path / "killed", 10)
    assert 10 <= stopped_at < 60
    assert main(finetune_args(base, tmp_path / "killed", *args, "--resume")) == 0
    assert main(finetune_args(base, tmp_path / "whole", *args)) == 0
    killed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert len(killed["losses"]) == 60
    assert killed["losses"] == whole["losses"] and killed["evals"] == whole["evals"]


def test_memory_command_prints_estimate_and_measurement(capsys):
    assert main(["memory", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
                 "--vocab-size", "100", "--batch-size", "2", "--r", "4", "--measure", "--mode", "full", "lora"]) == 0
    out = capsys.readouterr().out
    for label in ("full (estimate)", "full (measured)", "lora (estimate)", "lora (measured)", "optimizer state"):
        assert label in out


def test_demo_at_tiny_size_prints_one_table_and_a_png(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--steps", "3",
            "--pretrain-steps", "3", "--n-train", "16", "--n-val", "4", "--vocab-size", "300", "--no-progress",
            *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if line.startswith("mode ")]
    assert len(header) == 1 and "exact match" in header[0] and "trainable params" in header[0]
    for mode in ("base", "full", "lora", "qlora"):
        assert any(line.startswith(mode + " ") for line in out.splitlines()), mode
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert not summary["base_cached"]
    assert main(args + ["--modes", "lora"]) == 0  # the second run reuses the pretrained base
    assert "(cached)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["finetune", "--base", "/nonexistent/base", "--out", "x"], "/nonexistent/base is not a directory"),
    (["generate", "--model", "/nonexistent/base"], "/nonexistent/base is not a directory"),
    (["generate", "--model", "{base}", "--adapter", "{tmp}"], "adapter_config.json not found"),
    (["generate", "--model", "{base}", "--adapter", "a={tmp}", "--adapter", "{tmp}"], "each must be NAME=DIR"),
    (["finetune", "--base", "{base}", "--out", "{tmp}/o", "--mode", "lora", "--init", "loftq"], "'loftq' with mode"),
    (["pretrain", "--out", "{tmp}", "--vocab-size", "100", "--steps", "1"], "vocab_size"),
])
def test_bad_arguments_end_in_one_error_line(argv, needle, base, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{base}", str(base)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_argparse_errors_and_no_traceback_from_the_module():
    with pytest.raises(SystemExit) as e:
        main(["demo", "--steps", "0"])
    assert e.value.code == 2
    r = subprocess.run([sys.executable, "-m", "minilora", "finetune", "--base", "/nope", "--out", "/tmp/x"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
