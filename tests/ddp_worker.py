"""One rank of a data-parallel fine-tune, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT '[{"name": ..., "cfg": {...}}]'

Trains the tiny LoRA / QLoRA runs listed in the JSON one after another (the same base model and data every
time, see tiny_base and tiny_data); rank 0 writes OUT/<name>.safetensors (the trainable parameters) and
OUT/<name>.json (losses, tokens, communication counts, adapter bytes, the model's bytes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from minilora import GPT, GPTConfig
from minilora.data import ByteTokenizer, InstructionSet, yoda_dataset
from minilora.parallel import trainable_bytes
from minilora.train import TrainConfig, train

CONFIG = GPTConfig(block_size=192, vocab_size=257, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def tiny_base() -> GPT:
    """A small random GPT, identical in every process (fixed seed)."""
    torch.manual_seed(1234)
    return GPT(dataclasses.replace(CONFIG))  # its own config: training switches checkpointing on in it


def tiny_data(n: int = 48) -> InstructionSet:
    """n Yoda examples, byte-tokenized."""
    train_ex, _ = yoda_dataset(n, 0, seed=3)
    return InstructionSet(train_ex, ByteTokenizer(), CONFIG.block_size)


def initial_adapters(cfg: dict) -> dict[str, torch.Tensor]:
    """The trainable parameters before training (prepare_model seeds them from cfg's seed)."""
    from minilora.train import prepare_model
    model = prepare_model(tiny_base(), TrainConfig(**{"progress": False, **cfg}))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(name: str, cfg: dict, out: Path) -> dict:
    """Train one run; return what rank 0 records about it."""
    cfg = TrainConfig(**{"progress": False, **cfg})
    res = train(tiny_base(), cfg, tiny_data())
    trained = {n: p.detach().cpu().contiguous() for n, p in res.model.named_parameters() if p.requires_grad}
    model_bytes = sum(t.numel() * t.element_size() for t in res.model.state_dict().values())
    info = {"losses": res.losses, "tokens": res.tokens, "extra": res.extra,
            "adapter_bytes": trainable_bytes(res.model), "model_bytes": model_bytes}
    if res.extra.get("rank", 0) == 0:
        from safetensors.torch import save_file
        save_file(trained, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(info))
    return info


def main() -> None:
    out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for r in runs:
        run(r["name"], r["cfg"], out)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
