"""A small GPT with GPT-2's architecture and GPT-2's parameter names.

Module paths are the ones Hugging Face's GPT2LMHeadModel uses (transformer.wte, transformer.h.0.attn.c_attn,
...), so a GPT-2 checkpoint loads by name and LoRA adapter keys line up with PEFT's. Reading and writing
Hugging Face's GPT-2 directories (config.json + model.safetensors) lives in hf/gpt2.py.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpointing import checkpoint_sequential
from .hf import gpt2 as hf_gpt2
from .data.token_ids import check_token_ids


@dataclass
class GPTConfig:
    block_size: int = 1024       # longest sequence (GPT-2: n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    gradient_checkpointing: bool = False
    checkpoint_segments: int | None = None  # None: ceil(sqrt(n_layer)) segments
    activation_function: str = "gelu_new"   # the MLP's nonlinearity, by transformers' name (ACTIVATIONS)
    scale_attn_weights: bool = True         # scores Q Kᵀ / √hs (False: Q Kᵀ)
    scale_attn_by_inverse_layer_idx: bool = False  # scores also / (layer index + 1)
    tie_word_embeddings: bool = True        # lm_head.weight is wte.weight (False: its own matrix)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        s = self.checkpoint_segments
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= self.n_layer):
            raise ValueError(f"GPTConfig.checkpoint_segments must be None (⌈√n_layer⌉) or an int in "
                             f"[1, n_layer={self.n_layer}], got {s!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation_function must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation_function!r}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    return F.gelu(x, approximate="tanh")


# The activations transformers' GPT-2 accepts (its ACT2FN names), each as the formula it computes. The two
# with learned parameters there (prelu, xielu) are not GPT-2 activations minilora can load: refused.
ACTIVATIONS = {
    "gelu_new": _tanh_gelu, "gelu_pytorch_tanh": _tanh_gelu, "gelu_python_tanh": _tanh_gelu,
    "gelu_fast": _tanh_gelu, "gelu_accurate": _tanh_gelu,
    "gelu": F.gelu, "gelu_python": F.gelu,                         # x Φ(x), with erf
    "gelu_10": lambda x: F.gelu(x).clamp(-10.0, 10.0),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "relu": F.relu, "relu6": F.relu6, "relu2": lambda x: F.relu(x).square(), "leaky_relu": F.leaky_relu,
    "silu": F.silu, "swish": F.silu, "mish": F.mish, "hardswish": F.hardswish,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "linear": lambda x: x,
}


class CausalSelfAttention(nn.Module):
    """softmax(Q Kᵀ · scale + causal mask) V over n_head heads, then the output projection.

    scale = 1/√hs (GPT-2's default; 1 with scale_attn_weights=False), further / (layer_idx + 1) with
    scale_attn_by_inverse_layer_idx."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.scale = 1.0 / math.sqrt(config.n_embd // config.n_head) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.scale)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """c_proj(act(c_fc(x))), 4x wide; act is GPT-2's tanh approximation of GELU unless the config names another."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.activation_function]
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab); with targets also the mean cross-entropy over targets != -100."""
        check_token_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        x = self.run_blocks(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer blocks in order; with gradient checkpointing, in recomputed segments."""
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint_sequential(self.transformer.h, x, segments=self.config.checkpoint_segments)
        for block in self.transformer.h:
            x = block(x)
        return x

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, greedy: bool = False, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens tokens to idx (B, T): argmax if greedy, else sample softmax(logits / temperature)
        restricted to the top_k most likely tokens. Stops early once every row has produced eos_token_id."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use greedy=True)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        was_training = self.training
        self.eval()
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :].float()  # (B, vocab)
            if greedy:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                scaled = logits / temperature  # a T so small that this overflows (1e-300 is 0 in float32): the
                if not bool(scaled.isfinite().all()):  # limit T -> 0, logits shifted so the largest stay at 0
                    shifted = logits - logits.amax(-1, keepdim=True)  # (softmax is shift-invariant)
                    scaled = torch.where(shifted == 0, 0.0, shifted / temperature)
                logits = scaled
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
            if eos_token_id is not None:
                done |= nxt.squeeze(1) == eos_token_id
                if bool(done.all()):
                    break
        self.train(was_training)
        return idx

    # ----- GPT-2 checkpoints (Hugging Face layout: config.json + model.safetensors), read and written by hf/gpt2.py -----

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "GPT":
        """Load a local Hugging Face GPT-2 directory; config.json fields minilora does not implement are refused."""
        unknown = sorted(set(overrides) - {f.name for f in fields(GPTConfig)})
        if unknown:
            raise TypeError(f"from_pretrained: unknown GPTConfig field {unknown[0]!r}")
        config, sd = hf_gpt2.read_gpt2(path, ACTIVATIONS)
        model = cls(GPTConfig(**(config | overrides)))
        hf_gpt2.copy_into(model.state_dict(), sd, path, model.config.tie_word_embeddings)
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json + model.safetensors in GPT-2's layout, each atomically (a plain GPT only: a model
        with LoRA or NF4 layers is refused, merge_lora / merge_qlora first). The model is not changed."""
        tied = self.lm_head.weight is self.transformer.wte.weight  # what the model does, whatever was recorded
        # by attribute, not state_dict(): a sharded model (minilora.parallel.fsdp) holds its gathered tensors there
        tensors = dict([*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)])
        hf_gpt2.save_gpt2(asdict(self.config) | {"tie_word_embeddings": tied}, tensors, path)
