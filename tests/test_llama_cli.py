"""python -m minilora on a Llama: memory presets and --config, QLoRA finetune --base a Llama directory (single
process, killed and resumed, 2-rank DDP and --fsdp), generate --model with its adapter."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from killing import kill_at_step
from minilora.__main__ import main
from minilora.llama import Llama, LlamaConfig
from minilora.memory import estimate
from minilora.memory.llama import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import finish, no_leftover_processes, torchrun  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"llama-2-7b": "6,738,415,616", "llama-65b": "65,285,660,672", "llama-2-70b": "68,976,648,192",
          "llama-3-8b": "8,030,261,248"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random GQA Llama over bytes (257 ids: the ByteTokenizer a directory without a tokenizer gets)."""
    out = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    Llama(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160)).save_pretrained(out)
    return out


@pytest.mark.parametrize("preset", sorted(COUNTS))
def test_memory_preset_prints_the_exact_parameter_count(preset, capsys):
    assert main(["memory", "--model-preset", preset, "--mode", "qlora", "--r", "64", "--dtype", "bfloat16",
                 "--seq-len", "512", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{COUNTS[preset]} parameters" in out and out.startswith(preset)


def test_llama_2_70b_full_fine_tuning_is_12_bytes_per_parameter():
    """fp16 weights and gradients, fp32 Adam moments: 2 + 2 + 8 bytes per parameter (+ one fp32 step counter per
    tensor)."""
    config = LlamaConfig(**PRESETS["llama-2-70b"])
    full = estimate(config, "full", dtype="fp16", state_dtype="fp32", seq_len=512)
    n_tensors = 2 + 9 * config.num_hidden_layers + 1  # embed, head, norm; per layer 7 linears + 2 norms
    assert full.state_bytes - 4 * n_tensors == 12 * 68_976_648_192
    assert f"{full.state_bytes / 1e9:.1f}" == "827.7"


def test_memory_config_reads_a_directory_without_its_weights(base, tmp_path, capsys):
    (tmp_path / "config.json").write_text((base / "config.json").read_text())  # no safetensors beside it
    assert main(["memory", "--config", str(tmp_path), "--mode", "lora", "--measure", "--batch-size", "2",
                 "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Llama: 2 layers x 32 wide (4 query / 2 key-value heads, MLP 64), vocab 257")
    assert "lora (estimate)" in out and "lora (measured)" in out


def finetune(base, out, *extra, mode="qlora"):
    return ["finetune", "--base", str(base), "--out", str(out), "--mode", mode, "--n-train", "24", "--n-val", "4",
            "--batch-size", "4", "--lora-r", "2", "--no-progress", *extra]


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_qlora_finetune_of_a_llama_then_generate_with_its_adapter(base, tmp_path, capsys):
    assert main(finetune(base, tmp_path / "run", "--steps", "4")) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    assert main(["generate", "--model", str(base), "--adapter", str(tmp_path / "run" / "adapter"), "--qlora",
                 "--context", "You must learn patience.", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    from minilora import ByteTokenizer, load_qlora_adapter
    from minilora.generate import respond
    model = load_qlora_adapter(Llama.from_pretrained(base), tmp_path / "run" / "adapter", compute_dtype=torch.float32)
    assert printed == respond(model, ByteTokenizer(), "Say it like Yoda.", "You must learn patience.", 5) + "\n"


def test_a_killed_llama_finetune_resumes_bit_exactly(base, tmp_path):
    args = ["--steps", "12", "--save-every", "2", "--gradient-checkpointing"]
    stopped_at = kill_at_step(finetune(base, tmp_path / "killed", *args), tmp_path / "killed", 4)
    assert 4 <= stopped_at < 12
    assert main(finetune(base, tmp_path / "killed", *args, "--resume")) == 0
    assert main(finetune(base, tmp_path / "whole", *args)) == 0
    killed, whole = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("killed", "whole"))
    assert len(killed["losses"]) == 12 and killed["losses"] == whole["losses"]
    a, b = adapter(tmp_path / "killed"), adapter(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode,sharding", [("qlora", ["--fsdp"]), ("qlora", []), ("lora", [])],
                         ids=["qlora-fsdp", "qlora-ddp", "lora-ddp"])
def test_two_ranks_write_the_single_process_adapter(base, tmp_path, mode, sharding):
    """2 ranks under torchrun, each on half of every batch: DDP (the adapters' gradients all-reduced), or --fsdp
    (one decoder layer per unit, checkpointed layer by layer). Equal adapters and losses within 1e-5."""
    args = ["--steps", "4", "--gradient-checkpointing"]
    p = torchrun("-m", "minilora", *finetune(base, tmp_path / "ranks", *args, *sharding, mode=mode))
    assert main(finetune(base, tmp_path / "single", *args, mode=mode)) == 0
    log = finish(p)
    assert p.returncode == 0, log
    a, b = adapter(tmp_path / "ranks"), adapter(tmp_path / "single")
    rel = lambda x, y: ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()  # noqa: E731
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2 and max(rel(a[k], b[k]) for k in a) <= 1e-5
    ranks, single = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ranks", "single"))
    assert ranks["config"]["fsdp"] == bool(sharding) and ranks["losses"] == pytest.approx(single["losses"], rel=1e-5)
