"""Machinery: the `python -m minilora memory` command, estimate() per mode (and one measured step) as one table."""
from __future__ import annotations

import torch

from ..gpt import GPT, GPTConfig
from ..llama import Llama, LlamaConfig
from ..train import TrainConfig, measure_step_memory, prepare_model
from ..train_config import DEFAULT_TARGETS, LLAMA_TARGETS
from .breakdown import format_table
from .estimate import estimate
from .llama import PRESETS


def default_targets(targets, config) -> tuple[str, ...]:
    """targets, or (None) every linear layer inside the blocks of the config's model family."""
    return tuple(targets) if targets else (LLAMA_TARGETS if isinstance(config, LlamaConfig) else DEFAULT_TARGETS)


def describe(config, name: str | None = None) -> str:
    """One line naming the model's shape."""
    if isinstance(config, LlamaConfig):
        return (f"{name or 'Llama'}: {config.num_hidden_layers} layers x {config.hidden_size} wide "
                f"({config.num_attention_heads} query / {config.num_key_value_heads} key-value heads, MLP "
                f"{config.intermediate_size}), vocab {config.vocab_size}")
    return f"GPT: {config.n_layer} layers x {config.n_embd} wide, vocab {config.vocab_size}"


def cmd_memory(a) -> None:
    """The memory command: a (argparse) holds its arguments (python -m minilora memory --help)."""
    if a.measure and a.fsdp > 1:
        raise ValueError("--measure runs one process; measure FSDP under torchrun (see tests/test_fsdp.py)")
    if a.model_preset:
        cfg = LlamaConfig(**PRESETS[a.model_preset])
    else:
        from .. import model_config
        cfg = model_config(a.model, "memory") if a.model else GPTConfig(
            block_size=a.block_size, vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    a.targets = default_targets(a.targets, cfg)
    seq, rows = a.seq_len or cfg.block_size, []
    opt = TrainConfig(optimizer=a.optimizer or "adamw", paged=a.paged).optimizer  # --paged alone: "paged"
    for mode in a.mode:
        if a.measure and estimate(cfg, "full").n_params > 50_000_000:
            raise ValueError(f"--measure runs a real step; {estimate(cfg, 'full').n_params:,} parameters is too large "
                             f"for it here")
        rows.append(estimate(cfg, mode, batch_size=a.batch_size, seq_len=seq, r=a.r, targets=tuple(a.targets),
                             dtype=a.dtype, compute_dtype=a.dtype, state_dtype="float32", optimizer=opt,
                             checkpointing=a.gradient_checkpointing, fsdp=a.fsdp, cpu_offload=a.cpu_offload,
                             device="cpu", label=f"{mode} (estimate)"))
        if a.measure:
            rows.append(_measure(cfg, mode, a, seq))
    fsdp = f"; per process of {a.fsdp} (FSDP{', CPU offload' if a.cpu_offload else ''})" if a.fsdp > 1 else ""
    print(f"{describe(cfg, a.model_preset)}, {rows[0].n_params:,} parameters; "
          f"batch {a.batch_size} x {seq} tokens; {a.dtype} weights, optimizer {opt}"
          f"{', gradient checkpointing' if a.gradient_checkpointing else ''}{fsdp}")
    print(format_table(rows))


def _measure(cfg, mode: str, a, seq: int):
    if a.dtype != "float32":
        raise ValueError("--measure trains a float32 model; leave --dtype at float32 to measure")
    tc = TrainConfig(mode=mode, r=a.r, targets=tuple(a.targets), gradient_checkpointing=a.gradient_checkpointing,
                     paged=a.paged, optimizer=a.optimizer or "adamw", batch_size=a.batch_size)
    torch.manual_seed(0)
    model = prepare_model((Llama if isinstance(cfg, LlamaConfig) else GPT)(cfg), tc)
    x = torch.randint(cfg.vocab_size, (a.batch_size, seq))
    m = measure_step_memory(model, tc, (x, x))
    m.label = f"{mode} (measured)"
    return m
