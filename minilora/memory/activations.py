"""What autograd saves during minilora's GPT forward, derived op by op: the analytic activation model.

Each operation saves only what its backward needs, and only if something upstream of it can learn:

    LayerNorm          x and its two statistics (mean, rstd: one value per token each)
    Linear y = x Wᵀ    x if W is trained (dW = dyᵀ x); nothing else (W itself is a parameter, free)
    LoRA  x Aᵀ Bᵀ      x in the adapters' dtype (for dA) and x Aᵀ, r values per token (for dB)
    QLoRA              the same two in the compute dtype; never the dequantized W (recomputed in backward)
    attention          q, k, v (one (B,T,3C) buffer), the output, and a log-sum-exp per head and token;
                       with dropout on the CPU, PyTorch's math kernel instead: fp32 copies of q, k, v and
                       three fp32 (B, n_head, T, T) tensors (probabilities, dropout mask, dropped ones)
    GELU               its input (B,T,4C)
    dropout            its mask: 1 byte per element on CUDA, the activation dtype on the CPU
    embeddings         the token and position indices (int64) if the tables are trained
    cross-entropy      log-probabilities in fp32 (B,T,vocab), the targets (int64) and one scalar

A tensor saved by several operations is stored once (ln_1's output feeds the attention's LoRA and its
base at once), so saved tensors are keyed by name and summed once. Per block and token with no dropout,
full fine-tuning saves 16·C activation values + (4 + n_head) fp32 statistics: x, ln_1(x), qkv (3C),
the attention output (which c_proj saves too: the fused kernels write it as (B, T, heads, head size), so
the transpose back to (B, T, C) copies nothing), x₂, ln_2(x₂), c_fc output (4C), GELU output (4C).

Without checkpointing everything saved in the forward is alive at its end, so the peak is the sum. With
gradient checkpointing (s segments, minilora.checkpointing) the forward keeps only each segment's input;
backward recomputes one segment at a time, so the peak is

    max( pre + Σ_j input_j + post ,  max_j  pre + Σ_{i ≤ j} input_i + saved(segment j) )

where pre and post are what the embeddings and the head / loss save (post is freed before the blocks'
backward begins).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..hf.gpt2 import LINEARS  # GPT-2's four linear layers per block
from .depth import SavedActivations, segment_count, walk_runs

KINDS = ("trained", "frozen", "lora", "qlora")


@dataclass
class ActivationSetup:
    """Everything the saved-tensor walk needs besides the GPT's shape.

    kinds[i][name]: how linear `name` of block i is trained ("trained", "frozen", "lora", "qlora"), or for a
    deep model runs [(count, {name: kind}), ...] of blocks trained alike; head_kind for lm_head. act: itemsize
    of the model's activations; adapter: of LoRA's A, B and x Aᵀ; compute: of a QLoRA layer's matmuls. device
    "cuda" or "cpu" changes dropout masks, the attention kernel under dropout, and (for 16-bit models) the
    LayerNorm statistics' dtype.
    """
    batch_size: int
    seq_len: int
    kinds: list[dict[str, str]] | list[tuple[int, dict[str, str]]]
    head_kind: str = "frozen"
    embeddings_trained: bool = False
    norms_trained: bool = False
    act: int = 4
    adapter: int = 4
    compute: int = 2
    adapter_cast: bool = False   # QLoRA: adapters stored in another dtype than compute (cast copies saved)
    r: int = 8
    dropout: float = 0.0
    lora_dropout: float = 0.0
    device: str = "cuda"


def kind_runs(kinds) -> list[tuple[int, dict[str, str]]]:
    """ActivationSetup.kinds as runs [(count, kinds of each block)]: given as runs, or one dict per block."""
    if all(isinstance(k, tuple) for k in kinds):
        return list(kinds)
    runs: list[tuple[int, dict[str, str]]] = []
    for k in kinds:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0] + 1, k)
        else:
            runs.append((1, k))
    return runs


def checkpointed(n: int, checkpoint_segments: int | None | bool) -> int | None:
    """The number of checkpointed segments of n blocks: None without checkpointing (False)."""
    return None if checkpoint_segments is False else segment_count(n, checkpoint_segments)


def record_linear(s: ActivationSetup, saved: dict, name: str, x: str, numel: int, x_rg: bool, kind: str,
                  n_in: int, n_out: int) -> bool:
    """Record what a linear layer `name` of kind `kind` saves (its input x has numel elements and requires grad
    if x_rg); return whether its output requires grad."""
    BT, mask = s.batch_size * s.seq_len, 1 if s.device == "cuda" else s.act
    if kind == "trained":
        saved[x] = numel * s.act
        return True
    if kind == "frozen":
        return x_rg
    if kind not in ("lora", "qlora"):
        raise ValueError(f"kind of {name} must be one of {KINDS}, got {kind!r}")
    item = s.adapter if kind == "lora" else s.compute
    if s.lora_dropout > 0:
        if x_rg:  # the mask is kept only if the dropout's input can receive a gradient
            saved[name + ".lora_dropout_mask"] = numel * mask
        x = name + ".lora_dropout_out"
    if item != s.act:  # x.to(adapter / compute dtype): each layer's own cast copy is what its matmul keeps
        x = f"{name}.x@{item}"
    saved[x] = numel * item
    saved[name + ".xA"] = BT * s.r * item
    if kind == "qlora" and s.adapter_cast:
        saved[name + ".A,B@compute"] = s.r * (n_in + n_out) * s.compute
    return True


def gpt_block(s: ActivationSetup, n_head: int, C: int, kinds: dict[str, str], x_rg: bool
              ) -> tuple[dict[str, int], dict[str, int], bool]:
    """What one GPT block saves (names inside the block; 'x' is its input), nothing shared with other blocks,
    and whether its output requires grad, given whether its input x does (x_rg)."""
    B, T = s.batch_size, s.seq_len
    BT, BTC = B * T, B * T * C
    mask = 1 if s.device == "cuda" else s.act
    stats = 4 if (s.act == 4 or s.device == "cuda") else s.act
    linear = functools.partial(record_linear, s)
    saved: dict[str, int] = {}
    # ln_1
    if x_rg or s.norms_trained:
        saved["x"] = BTC * s.act
        saved["ln_1.stats"] = 2 * BT * stats
    h_rg = x_rg or s.norms_trained
    qkv_rg = linear(saved, "attn.c_attn", "ln_1.out", BTC, h_rg, kinds["attn.c_attn"], C, 3 * C)
    math_kernel = s.dropout > 0 and s.device == "cpu"
    y = "attn.y" if math_kernel else "attn.out"  # c_proj's input
    if qkv_rg:
        if math_kernel:  # fp32 copies of q, k, v and three (T × T) fp32 tensors: probs, mask, dropped
            saved["attn.q,k,v"] = 3 * BTC * 4
            saved["attn.probs,mask,dropped"] = 3 * B * n_head * T * T * 4
        else:  # fused kernel: q, k, v as views of one buffer, the output, log-sum-exp (fp32)
            saved["attn.qkv"] = 3 * BTC * s.act
            saved["attn.out"] = BTC * s.act  # laid out (B, T, nh, hs): the re-layout is free
            saved["attn.lse"] = B * n_head * T * 4
    a_rg = linear(saved, "attn.c_proj", y, BTC, qkv_rg, kinds["attn.c_proj"], C, C)
    if a_rg and s.dropout > 0:
        saved["attn.dropout_mask"] = BTC * mask
    x2_rg = x_rg or a_rg
    # ln_2
    if x2_rg or s.norms_trained:
        saved["x2"] = BTC * s.act
        saved["ln_2.stats"] = 2 * BT * stats
    h2_rg = x2_rg or s.norms_trained
    f_rg = linear(saved, "mlp.c_fc", "ln_2.out", BTC, h2_rg, kinds["mlp.c_fc"], C, 4 * C)
    if f_rg:
        saved["mlp.fc_out"] = 4 * BTC * s.act  # GELU's input
    m_rg = linear(saved, "mlp.c_proj", "mlp.gelu_out", 4 * BTC, f_rg, kinds["mlp.c_proj"], 4 * C, C)
    if m_rg and s.dropout > 0:
        saved["mlp.dropout_mask"] = BTC * mask
    return saved, {}, x2_rg or m_rg


def saved_activations(n_layer: int, n_head: int, n_embd: int, vocab_size: int, s: ActivationSetup,
                      checkpoint_segments: int | None | bool = False) -> SavedActivations:
    """Walk minilora's GPT forward and list the tensors autograd saves (see the module docstring), one block
    per run of blocks trained alike (minilora.memory.depth adds them up). n_layer: the blocks s.kinds describes.

    checkpoint_segments: False for no checkpointing, None for ⌈√n_layer⌉ segments, or a segment count.
    """
    B, T, C = s.batch_size, s.seq_len, n_embd
    BT, BTC = B * T, B * T * C
    mask = 1 if s.device == "cuda" else s.act
    stats = 4 if (s.act == 4 or s.device == "cuda") else s.act

    pre: dict[str, int] = {}
    if s.embeddings_trained:
        pre["idx"] = BT * 8
        pre["pos"] = T * 8
        if s.dropout > 0:
            pre["emb.dropout_mask"] = BTC * mask
    runs, x_rg = walk_runs(functools.partial(gpt_block, s, n_head, C), kind_runs(s.kinds), s.embeddings_trained)
    n = sum(r.count for r in runs)

    post: dict[str, int] = {}
    if x_rg or s.norms_trained:
        post[f"h{n}.x"] = BTC * s.act
        post["ln_f.stats"] = 2 * BT * stats
    head_rg = record_linear(s, post, "lm_head", "ln_f.out", BTC, x_rg or s.norms_trained, s.head_kind, C,
                            vocab_size)
    if head_rg:
        post["log_probs"] = BT * vocab_size * 4  # logits.float() -> log_softmax output, fp32
        post["targets"] = BT * 8
        post["total_weight"] = 4
    return SavedActivations(pre=pre, runs=runs, post=post, n_segments=checkpointed(n, checkpoint_segments),
                            tokens=BT, input_bytes=BTC * s.act)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()
