"""A Llama-architecture model with transformers' parameter names: RMSNorm, rotary positions, SwiGLU, GQA.

What changed from GPT-2 (gpt.py), block by block:
    LayerNorm            -> RMSNorm: x / √(mean(x²) + ε) · g, no mean subtracted, no bias
    learned positions    -> rotary embeddings: q and k rotated by an angle proportional to the position
    GELU MLP (4x)        -> SwiGLU: down(silu(gate(x)) ⊙ up(x)), intermediate_size wide
    one K/V per head     -> grouped-query attention: num_key_value_heads K/V heads, each shared by a group of
                            num_attention_heads / num_key_value_heads query heads (smaller k_proj and v_proj)
    fused c_attn         -> separate q_proj, k_proj, v_proj, o_proj: the seven LoRA targets PEFT users name

Module paths are those of transformers' LlamaForCausalLM (model.embed_tokens, model.layers.N.self_attn.q_proj,
model.layers.N.mlp.gate_proj, model.norm, lm_head), so its checkpoints and PEFT's adapters fit by name.
Reading and writing Hugging Face directories lives in minilora/hf/llama.py; this file does no I/O.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpointing import checkpoint_sequential
from .gpt import GPT
from .data.token_ids import check_token_ids
from .ops.linear_cross_entropy import head_and_loss

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None    # None: num_attention_heads (no grouping)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # None, or Llama-3's {"rope_type": "llama3", *LLAMA3_KEYS}
    tie_word_embeddings: bool = False
    attention_bias: bool = False              # biases on q_proj, k_proj, v_proj and o_proj
    head_dim: int | None = None               # None: hidden_size // num_attention_heads
    o_proj_bias: bool | None = None           # None: attention_bias (Qwen2: q/k/v biased, o_proj not)
    gradient_checkpointing: bool = False      # minilora's own settings, as GPTConfig's
    checkpoint_segments: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_attention_heads ({self.num_attention_heads}), or head_dim given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2 or self.head_dim <= 0:
            raise ValueError(f"LlamaConfig.head_dim must be a positive even int (rotary pairs), got {self.head_dim}")
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"LlamaConfig.rms_norm_eps, rope_theta must be > 0: {self.rms_norm_eps}, {self.rope_theta}")
        rs = self.rope_scaling
        if rs is not None and (not isinstance(rs, dict) or rs.get("rope_type") != "llama3"
                               or sorted(set(rs) - {"rope_type"}) != sorted(LLAMA3_KEYS)):
            raise ValueError(f"LlamaConfig.rope_scaling must be None or {{'rope_type': 'llama3', "
                             f"{', '.join(LLAMA3_KEYS)}}}, got {rs!r}")
        s = self.checkpoint_segments
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= self.num_hidden_layers):
            raise ValueError(f"LlamaConfig.checkpoint_segments must be None (⌈√n⌉) or an int in "
                             f"[1, {self.num_hidden_layers}], got {s!r}")

    @property
    def block_size(self) -> int:
        """The longest sequence (GPTConfig's name for max_position_embeddings)."""
        return self.max_position_embeddings


def rope_frequencies(config: LlamaConfig, device=None) -> torch.Tensor:
    """θ_i = rope_theta^(-2i/d) for the d/2 rotary pairs of a head (d = head_dim), in fp32.

    Llama-3's scaling stretches the context: a wavelength 2π/θ longer than original/low_freq_factor is divided
    by factor, one shorter than original/high_freq_factor is kept, and those between are interpolated."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))  # (d/2,)
    if config.rope_scaling is None:
        return inv_freq
    factor, low, high, old = (config.rope_scaling[k] for k in LLAMA3_KEYS)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    between = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: pair i is (x_i, x_{i+d/2}), transformers' layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """y = g ⊙ x / √(mean(x²) + ε), computed in fp32 and cast back (no mean subtracted, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    """softmax(R(q) R(k)ᵀ / √d + causal mask) v, R rotating each (x_i, x_{i+d/2}) pair by angle pos·θ_i; every
    K/V head is shared by num_attention_heads / num_key_value_heads query heads (GQA; MHA when they are equal)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        C, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(C, self.n_head * self.hd, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv * self.hd, bias=bias)  # GQA: n_kv/n_head of q_proj's rows
        self.v_proj = nn.Linear(C, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, C, bias=config.o_proj_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # cos, sin: (T, hd)
        if self.n_kv != self.n_head:  # each K/V head serves n_head / n_kv consecutive query heads
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, T, hd)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd), scale 1/√hd
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class LlamaMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) ⊙ up_proj(x)), intermediate_size wide, no biases."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()  # transformers' LlamaModel: embed_tokens, layers, norm
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for m in self.modules():  # N(0, 0.02) as transformers initialises Llama; biases zero, norms one
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def rope(self, T: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles pos·θ_i for positions 0..T-1, each (T, head_dim): both halves share θ_i."""
        freqs = torch.arange(T, device=device).float()[:, None] * rope_frequencies(self.config, device)  # (T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab); with targets also the mean cross-entropy over targets != -100."""
        check_token_ids(idx, self.config.vocab_size)
        x = self.model.embed_tokens(idx)  # (B, T, C): no position embedding, positions enter q and k by rotation
        x = self.run_blocks(x, *self.rope(idx.size(1), idx.device, x.dtype))
        x = self.model.norm(x)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab)
        return head_and_loss(self.lm_head, x, targets)  # the head and the loss in one step: ops/linear_cross_entropy.py

    def run_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The decoder layers in order; with gradient checkpointing, in recomputed segments (the rotary tables
        are constants every layer takes, passed along to each)."""
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint_sequential(self.model.layers, x, cos, sin, segments=self.config.checkpoint_segments)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return x

    generate = GPT.generate  # the same sampling loop: argmax or top-k sampling, one token at a time

    # ----- Hugging Face directories (config.json + safetensors), read and written by minilora/hf/llama.py -----

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, **overrides) -> "Llama":
        """Load a local transformers directory (or a Hub id from huggingface_hub's cache) of a Llama-family
        model; dtype None keeps the checkpoint's. Config fields minilora does not implement are refused."""
        from .hf.llama import read
        settings, sd = read(path, dtype)
        for key in sorted(set(overrides) - {f.name for f in fields(LlamaConfig)}):
            raise TypeError(f"from_pretrained: unknown LlamaConfig field {key!r}")
        with torch.device("meta"):  # no random init of weights about to be replaced
            model = cls(LlamaConfig(**(settings | overrides)))
        if model.config.tie_word_embeddings:  # (read() checked every name and shape)
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, assign=True)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json and model.safetensors (sharded with an index beyond max_shard_bytes), each
        atomically. The model is left as it was; one with LoRA or NF4 layers is refused (merge first)."""
        from .hf.llama import write
        tied = self.lm_head.weight is self.model.embed_tokens.weight  # what the model does, whatever was recorded
        sd = {k: v for k, v in self.state_dict(keep_vars=True).items() if not (tied and k == "lm_head.weight")}
        write(path, asdict(self.config) | {"tie_word_embeddings": tied}, sd, max_shard_bytes)
