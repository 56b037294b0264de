"""The analytic side: bytes of a training step from a GPTConfig or LlamaConfig and a recipe, without running anything.

Per parameter of the base model (full fine-tuning, AdamW, torch's defaults):

    weights  +  gradients  +  exp_avg + exp_avg_sq          bytes/param
    fp32:         4        +      4       +   4 + 4       =  16
    lecture:  fp16 2       +  fp16 2      +  fp32 4 + 4   =  12   -> 10B params: 120 GB
    mixed precision: the lecture's 12 + an fp32 master copy 4 = 16

LoRA freezes the base (weights only) and trains A (r × in) and B (out × r) per target layer, each with its
gradient and AdamW state. QLoRA stores the base linears as NF4 with double quantization:

    4 bits (code) + 8/64 (an 8-bit absmax per 64 weights) + 32/(64·256) (an fp32 absmax per 256 blocks)
    = 4.127 bits per weight (+ 4 bytes of offset per tensor)

while the embeddings, norms, biases and the tied lm_head stay in the model's dtype. Activations come from
minilora.memory.activations (minilora.memory.llama for a Llama). The parameter inventory is the model's parts
outside the blocks + n_layer × one block (minilora.memory.inventory: one block built on the "meta" device,
shapes only), so a 65B model, or one of a million layers, costs nothing to describe. With fsdp=N every byte is
that of one process of N sharding the model (minilora.memory.sharded states the sharded and gathered terms).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..gpt import GPTConfig
from ..llama import LlamaConfig
from ..quant.format import nf4_nbytes  # the NF4 byte count, stated once (re-exported by minilora.memory)
from .activations import LINEARS, ActivationSetup, SavedActivations, itemsize, saved_activations
from .inventory import Layers, Selection
from ..optim.adamw import STATE_BYTES
from ..optim.adamw8bit import MIN_8BIT_SIZE
from ..optim.paged8bit import BLOCK_BYTES
from ..quant.format import BLOCKSIZE_8BIT as BLOCK
from .breakdown import MemoryBreakdown
from ..train_config import DEFAULT_TARGETS, LLAMA_TARGETS, MODES, OPTIMIZERS
from .llama import LLAMA_LINEARS, saved_activations_llama
from .sharded import Sharding, check_fsdp, offload, shard_numel

STEP_BYTES = 4  # AdamW's step counter: one fp32 scalar tensor per parameter tensor

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def as_dtype(value: torch.dtype | str, name: str) -> torch.dtype:
    """A torch floating dtype from a dtype or a name ('fp16', 'bf16', 'fp32', 'float16', ...)."""
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise TypeError(f"{name} must be a floating torch.dtype or one of {sorted(_DTYPES)}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gpt_param_count(config: GPTConfig) -> int:
    """Parameters of minilora's GPT (lm_head tied to wte): V·C + T·C + L·(12C² + 13C) + 2C (with biases)."""
    C, L = config.n_embd, config.n_layer
    per_block = 12 * C * C + (13 * C if config.bias else 4 * C)
    return (config.vocab_size + config.block_size) * C + L * per_block + (2 if config.bias else 1) * C


def scaled_config(n_params: int, n_layer: int, n_embd: int, n_head: int, block_size: int = 2048,
                  **overrides) -> GPTConfig:
    """minilora's GPT with the given depth and width, its vocabulary sized so the model has n_params
    parameters (exactly when n_params is a multiple of n_embd, else the nearest count)."""
    probe = GPTConfig(block_size=block_size, vocab_size=1, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      **overrides)
    vocab = round((n_params - gpt_param_count(probe)) / n_embd) + 1
    if vocab < 1:
        raise ValueError(f"scaled_config: {n_layer} layers of width {n_embd} already exceed n_params={n_params:.3g}; "
                         f"use fewer layers or a smaller n_embd")
    return GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     **overrides)


def n_layers(config: GPTConfig | LlamaConfig) -> int:
    """The number of transformer blocks (GPT-2's n_layer, Llama's num_hidden_layers)."""
    return config.num_hidden_layers if isinstance(config, LlamaConfig) else config.n_layer


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def estimate(config: GPTConfig | LlamaConfig, mode: str = "full", *, batch_size: int = 1, seq_len: int | None = None,
             r: int = 8, targets: str | Iterable[str] | None = None, lora_dropout: float = 0.0,
             dtype: torch.dtype | str = torch.float32, adapter_dtype: torch.dtype | str | None = None,
             compute_dtype: torch.dtype | str = torch.bfloat16, grad_dtype: torch.dtype | str | None = None,
             state_dtype: torch.dtype | str | None = None, master_weights: bool = False,
             optimizer: str = "adamw", page_size: int = 2**20, device_budget: int | None = None,
             checkpointing: bool | None = None, checkpoint_segments: int | None = None,
             quant_targets: str | Iterable[str] | None = None, blocksize: int = 64, double_quant: bool = True,
             fsdp: int = 1, cpu_offload: bool = False, device: str = "cuda", label: str = "") -> MemoryBreakdown:
    """Analytic training memory of minilora's GPT or Llama for one step (the module docstring has the formulas).

    mode: "full" (every parameter trained), "lora" (frozen base + adapters on `targets`, rank r; default every
    linear layer inside the blocks) or "qlora" (the `quant_targets` linears in NF4 — default every untied
    nn.Linear of a GPT, every linear inside a Llama's layers: its lm_head stays 16-bit, as bitsandbytes
    leaves it — plus adapters).
    dtype: the model's weights and activations. adapter_dtype: LoRA's A and B (default: dtype for LoRA,
    compute_dtype for QLoRA, as minilora creates them). grad_dtype, state_dtype: gradients and AdamW state
    (default: each parameter's own dtype, as torch does; the lecture's recipe is dtype=fp16, state_dtype=fp32).
    master_weights: add an fp32 copy of every 16-bit trainable parameter (mixed precision).
    optimizer: "adamw", "paged" (PagedAdamW: fp32 state of all trainable tensors laid end to end in
    page_size pages, at most device_budget bytes of them on the device, the rest in host memory ->
    `offloaded`), "adamw8bit" (AdamW8bit: 2 bytes per element + 8 per block of 256; tensors under 4,096
    elements keep fp32 state) or "paged8bit" (PagedAdamW8bit: that state in pages).
    checkpointing / checkpoint_segments: default to the config's gradient_checkpointing / checkpoint_segments
    (with fsdp > 1: every block its own segment, as minilora.parallel.fsdp replays them).
    fsdp: the bytes of one process (rank 0) of fsdp sharding the model (minilora.memory.sharded): every
    parameter, gradient and AdamW state on ⌈dim 0 / fsdp⌉ rows, + `gathered` (root unit + largest block),
    activations of ⌈batch_size / fsdp⌉ sequences (batch_size: the global micro-batch, at least fsdp).
    cpu_offload (fsdp > 1): the shards, gradients and optimizer state in host memory (`offloaded`).
    device: "cuda" or "cpu", the kernels whose saved tensors are modelled (they differ only under dropout,
    and in the dtype of LayerNorm statistics of 16-bit models).
    """
    if not isinstance(config, (GPTConfig, LlamaConfig)):
        raise TypeError(f"config must be a GPTConfig or a LlamaConfig, got {type(config).__name__}")
    llama, L = isinstance(config, LlamaConfig), n_layers(config)
    targets = (LLAMA_TARGETS if llama else DEFAULT_TARGETS) if targets is None else targets
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    batch_size, r = _check_positive_int(batch_size, "batch_size"), _check_positive_int(r, "r")
    check_fsdp(fsdp, cpu_offload, optimizer, batch_size)
    batch_size = math.ceil(batch_size / fsdp)  # from here on: rank 0's share of the micro-batch
    seq_len = config.block_size if seq_len is None else _check_positive_int(seq_len, "seq_len")
    if seq_len > config.block_size:
        raise ValueError(f"seq_len={seq_len} exceeds config.block_size={config.block_size}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    dtype = as_dtype(dtype, "dtype")
    compute_dtype = as_dtype(compute_dtype, "compute_dtype")
    if adapter_dtype is None:
        adapter_dtype = compute_dtype if mode == "qlora" else dtype
    adapter_dtype = as_dtype(adapter_dtype, "adapter_dtype")
    grad_dtype = None if grad_dtype is None else as_dtype(grad_dtype, "grad_dtype")
    state_dtype = None if state_dtype is None else as_dtype(state_dtype, "state_dtype")
    if checkpointing is None:
        checkpointing = config.gradient_checkpointing
    if fsdp > 1 and checkpoint_segments not in (None, L):
        raise ValueError(f"checkpoint_segments must be {L} with fsdp > 1 (one per block), got {checkpoint_segments}")
    if checkpoint_segments is None:  # minilora.parallel.fsdp checkpoints block by block
        checkpoint_segments = config.checkpoint_segments if fsdp == 1 else L

    layers = Layers(config)  # outside the blocks + one block standing for all of them
    lora = layers.select(targets) if mode != "full" else Selection()
    quant = Selection()
    if mode == "qlora":
        quant = layers.select(quant_targets) if quant_targets is not None else \
            layers.untied(layers.select(LLAMA_TARGETS) if llama else None)
    layers.check_linear(lora)
    layers.check_linear(quant)

    out = MemoryBreakdown(label=label or mode, tokens=batch_size * seq_len)
    by_dtype: dict[str, int] = {}
    paged_elems: list[int] = []  # numel of the trainable tensors, for page rounding

    shards = Sharding(fsdp)  # fsdp=1: every tensor whole, on the one process

    def train(shape: tuple[int, ...], p_dtype: torch.dtype, adapter: bool, times: int) -> None:
        numel = shard_numel(shape, fsdp)  # gradients and AdamW state are sharded like the parameter
        g = itemsize(grad_dtype or p_dtype)
        st = itemsize(state_dtype or p_dtype)
        grads = numel * g
        state = 2 * numel * st + STEP_BYTES
        eight_bit = optimizer.endswith("8bit") and numel >= MIN_8BIT_SIZE
        if optimizer.endswith("8bit"):  # 1 byte each for m and v + two fp32 absmax per block; small: fp32
            state = (2 * numel + 8 * math.ceil(numel / BLOCK) if eight_bit else STATE_BYTES * numel) + STEP_BYTES
        if optimizer == "paged" or (optimizer == "paged8bit" and eight_bit):
            paged_elems.append(times * (math.ceil(numel / BLOCK) * BLOCK if eight_bit else numel))
            state = STEP_BYTES
        if adapter:
            out.adapter_gradients += times * grads
            out.adapter_optimizer_state += times * state
        else:
            out.gradients += times * grads
            out.optimizer_state += times * state
        if master_weights and itemsize(p_dtype) < 4:
            out.master_weights += times * 4 * numel
        out.n_trainable += times * math.prod(shape)

    def tensor(name: str, shape: tuple[int, ...], nf4: bool, times: int) -> None:
        """A base parameter `times` over (one per block of a run): stored as it is or in NF4, trained in full."""
        out.n_params += times * math.prod(shape)
        if nf4:
            b = shards.nf4(name, math.prod(shape), blocksize, double_quant, times)
            out.quantized_weights += b
            by_dtype["nf4"] = by_dtype.get("nf4", 0) + b
        else:
            b = shards.param(name, shape, itemsize(dtype), times)
            out.weights += b
            by_dtype[dtype_name(dtype)] = by_dtype.get(dtype_name(dtype), 0) + b
        if mode == "full":
            train(shape, dtype, adapter=False, times=times)

    def adapters(name: str, lin, times: int) -> None:
        for shape in ((r, lin.in_features), (lin.out_features, r)):  # A (r × in), B (out × r)
            b = shards.param(name, shape, itemsize(adapter_dtype), times)
            out.adapters += b
            by_dtype[dtype_name(adapter_dtype)] = by_dtype.get(dtype_name(adapter_dtype), 0) + b
            train(shape, adapter_dtype, adapter=True, times=times)

    runs = layers.runs(lora, quant)  # (count, first block, (its LoRA targets, its NF4 targets))
    for name, p in layers.model.named_parameters():  # each tied tensor once
        module, _, leaf = name.rpartition(".")
        inside = layers.inside(module)
        if inside is None:
            tensor(name, tuple(p.shape), module in quant.outside and leaf == "weight", 1)
            continue
        for count, first, (_, nf4) in runs:  # block `first` stands for its run
            tensor(f"{layers.name(first, inside)}.{leaf}", tuple(p.shape), inside in nf4 and leaf == "weight", count)
    for name in sorted(lora.outside):
        adapters(name, layers.model.get_submodule(name), 1)
    for count, first, (adapted, _) in runs:
        for inside in sorted(adapted):
            adapters(layers.name(first, inside), layers.module(inside), count)
    out.weights_by_dtype, out.gathered = by_dtype, shards.gathered()

    if optimizer in ("paged", "paged8bit"):  # the paged tensors laid end to end, cut into pages
        if optimizer == "paged":
            page_bytes, page_elems = page_size, page_size // STATE_BYTES
        else:  # whole blocks of 256 elements per page, 520 bytes each
            page_bytes, page_elems = BLOCK_BYTES * (page_size // BLOCK_BYTES), BLOCK * (page_size // BLOCK_BYTES)
        pages = math.ceil(sum(paged_elems) / page_elems) * page_bytes
        resident = pages if device_budget is None else min(pages, device_budget // page_bytes * page_bytes)
        state_field = "optimizer_state" if mode == "full" else "adapter_optimizer_state"
        setattr(out, state_field, getattr(out, state_field) + resident)
        out.offloaded = pages if resident < pages else 0  # steady state: every page has a host copy

    acts = activation_model(config, mode, batch_size=batch_size, seq_len=seq_len, r=r, runs=runs,
                            head=("lm_head" in lora.outside, "lm_head" in quant.outside), lora_dropout=lora_dropout,
                            dtype=dtype, adapter_dtype=adapter_dtype, compute_dtype=compute_dtype,
                            checkpoint_segments=checkpoint_segments if checkpointing else False, device=device)
    out.activations, out.saved = acts.peak, acts
    if cpu_offload:
        offload(out, shards.replicated)
    return out


def activation_model(config: GPTConfig | LlamaConfig, mode: str, *, batch_size: int, seq_len: int, r: int,
                     runs: list, head: tuple[bool, bool], lora_dropout: float, dtype: torch.dtype,
                     adapter_dtype: torch.dtype, compute_dtype: torch.dtype,
                     checkpoint_segments: int | None | bool, device: str) -> SavedActivations:
    """The saved-tensor walk (minilora.memory.activations) for a mode and the layers it adapts/quantizes: runs
    as Layers.runs gives them (count, first block, (LoRA targets, NF4 targets)), head: (lm_head adapted,
    lm_head in NF4)."""
    def kind(adapted: bool, nf4: bool) -> str:
        if mode == "full":
            return "trained"
        return ("qlora" if nf4 else "lora") if adapted else "frozen"

    llama = isinstance(config, LlamaConfig)
    linears = LLAMA_LINEARS if llama else LINEARS
    kinds = [(count, {lin: kind(lin in adapted, lin in nf4) for lin in linears}) for count, _, (adapted, nf4) in runs]
    setup = ActivationSetup(batch_size=batch_size, seq_len=seq_len, kinds=kinds, head_kind=kind(*head),
                            embeddings_trained=mode == "full", norms_trained=mode == "full",
                            act=itemsize(dtype), adapter=itemsize(adapter_dtype), compute=itemsize(compute_dtype),
                            adapter_cast=mode == "qlora" and adapter_dtype != compute_dtype, r=r,
                            dropout=getattr(config, "dropout", 0.0), lora_dropout=lora_dropout, device=device)
    if llama:
        return saved_activations_llama(config, setup, checkpoint_segments)
    return saved_activations(config.n_layer, config.n_head, config.n_embd, config.vocab_size, setup,
                             checkpoint_segments)


def activation_bytes_per_token(config: GPTConfig | LlamaConfig, mode: str = "full", **kwargs) -> dict[str, float]:
    """Saved-activation bytes per token, without checkpointing: per transformer block ('per_block', the last
    block), for embeddings + head + loss ('outside') and in all ('total'). kwargs as for estimate()."""
    acts = estimate(config, mode, **{**kwargs, "checkpointing": False}).saved
    outside = sum(acts.pre.values()) + sum(acts.post.values())
    return dict(per_block=acts.per_token_per_block(), outside=outside / acts.tokens,
                total=acts.peak / acts.tokens)
