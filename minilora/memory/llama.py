"""The real models' memory: Llama presets, their exact parameter counts, and what a Llama layer saves for backward.

Parameters of a Llama (C = hidden_size, F = intermediate_size, d = head_dim, h / g query / key-value heads):

    per layer   C·h·d (q) + 2·C·g·d (k, v) + h·d·C (o) + 3·C·F (gate, up, down) + 2·C (two RMSNorms)
    outside     V·C (embed_tokens) + C (norm) + V·C (lm_head, unless tied)

The saved-tensor walk follows minilora/llama.py op by op, as activations.py does for the GPT:

    RMSNorm        x in fp32 (the model's x itself in an fp32 model, an fp32 copy in a 16-bit one) and
                   1/√(mean(x²)+ε) (one fp32 value per token) if x requires grad; the normalised x if g is trained
    rotary         cos and sin (T × d each), once per forward: the layers share them
    attention      q, k and v with every query head's copy of K/V (GQA repeats them before the fused kernel),
                   the output and a log-sum-exp per head and token
    SwiGLU         gate's output (for silu'), silu(gate) and up (for the product), the product (down's input)
"""
from __future__ import annotations

import functools

from ..train_config import LLAMA_TARGETS  # noqa: F401  (the seven names, re-exported here)
from .activations import ActivationSetup, SavedActivations, checkpointed, kind_runs, record_linear
from .depth import walk_runs

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# transformers' config.json values of the released models (shape fields only; vocabulary 32000 for Llama 1/2)
PRESETS = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                        rms_norm_eps=1e-5),
    "llama-65b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=64, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "llama-2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
                        rms_norm_eps=1e-5),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0),
}


def llama_param_count(config) -> int:
    """Parameters of a Llama from its LlamaConfig (the module docstring's formula), each tied tensor once."""
    C, F, d, V = config.hidden_size, config.intermediate_size, config.head_dim, config.vocab_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    bias = (q + 2 * kv if config.attention_bias else 0) + (C if config.o_proj_bias else 0)
    layer = C * q + 2 * C * kv + q * C + 3 * C * F + 2 * C + bias
    return V * C * (1 if config.tie_word_embeddings else 2) + config.num_hidden_layers * layer + C


def _rms_norm(s: ActivationSetup, saved: dict, x: str, C: int, x_rg: bool, trained: bool, out: str) -> bool:
    """What an RMSNorm of width C saves (module docstring); returns whether its output requires grad."""
    BT = s.batch_size * s.seq_len
    if x_rg:
        saved[x if s.act == 4 else x + "@fp32"] = BT * C * 4
        saved[out + ".rstd"] = BT * 4
    if trained:
        saved[out + ".normalised"] = BT * C * s.act
    return x_rg or trained


def llama_block(config, s: ActivationSetup, kinds: dict[str, str], x_rg: bool
                ) -> tuple[dict[str, int], dict[str, int], bool]:
    """What one decoder layer saves (names inside the layer; 'x' is its input), the rotary tables it shares
    with the others, and whether its output requires grad, given whether its input x does (x_rg)."""
    B, T, C, F = s.batch_size, s.seq_len, config.hidden_size, config.intermediate_size
    BTC, nh, d = B * T * C, config.num_attention_heads, config.head_dim
    q, kv = nh * d, config.num_key_value_heads * d
    saved: dict[str, int] = {}
    shared: dict[str, int] = {}
    h_rg = _rms_norm(s, saved, "x", C, x_rg, s.norms_trained, "ln_1")
    k_rg = [record_linear(s, saved, lin, "ln_1.out", BTC, h_rg, kinds[lin], C, n)
            for lin, n in zip(LLAMA_LINEARS[:3], (q, kv, kv))]
    if k_rg[0] or k_rg[1]:
        shared["rope.cos,sin"] = 2 * T * d * s.act  # one pair for the whole forward
    if any(k_rg):
        saved["attn.q,k,v"] = 3 * B * T * q * s.act  # K and V repeated for every query head
        saved["attn.out"] = B * T * q * s.act
        saved["attn.lse"] = B * nh * T * 4
    a_rg = record_linear(s, saved, LLAMA_LINEARS[3], "attn.out", B * T * q, any(k_rg), kinds[LLAMA_LINEARS[3]], q, C)
    x2_rg = x_rg or a_rg
    h2_rg = _rms_norm(s, saved, "x2", C, x2_rg, s.norms_trained, "ln_2")
    g_rg, u_rg = (record_linear(s, saved, lin, "ln_2.out", BTC, h2_rg, kinds[lin], C, F)
                  for lin in LLAMA_LINEARS[4:6])
    if g_rg:
        saved["mlp.gate_out"] = B * T * F * s.act  # silu's input
    if u_rg:
        saved["mlp.silu_out"] = B * T * F * s.act
    if g_rg:
        saved["mlp.up_out"] = B * T * F * s.act
    m_rg = record_linear(s, saved, LLAMA_LINEARS[6], "mlp.product", B * T * F, g_rg or u_rg,
                         kinds[LLAMA_LINEARS[6]], F, C)
    return saved, shared, x2_rg or m_rg


def saved_activations_llama(config, s: ActivationSetup, checkpoint_segments: int | None | bool = False
                            ) -> SavedActivations:
    """Walk minilora's Llama forward and list the tensors autograd saves (see the module docstring), one layer
    per run of layers trained alike. s.kinds is keyed by LLAMA_LINEARS; checkpoint_segments as for
    saved_activations."""
    BT, C = s.batch_size * s.seq_len, config.hidden_size
    pre: dict[str, int] = {"idx": BT * 8} if s.embeddings_trained else {}
    runs, x_rg = walk_runs(functools.partial(llama_block, config, s), kind_runs(s.kinds), s.embeddings_trained)
    n = sum(r.count for r in runs)
    post: dict[str, int] = {}
    n_rg = _rms_norm(s, post, f"h{n}.x", C, x_rg, s.norms_trained, "norm")
    if record_linear(s, post, "lm_head", "norm.out", BT * C, n_rg, s.head_kind, C, config.vocab_size):
        post |= {"log_probs": BT * config.vocab_size * 4, "targets": BT * 8, "total_weight": 4}
    return SavedActivations(pre=pre, runs=runs, post=post, n_segments=checkpointed(n, checkpoint_segments), tokens=BT,
                            input_bytes=BT * C * s.act)
