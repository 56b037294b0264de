"""A small GPT with GPT-2's architecture and GPT-2's parameter names.

Module paths are the ones Hugging Face's GPT2LMHeadModel uses (transformer.wte, transformer.h.0.attn.c_attn,
...), so a GPT-2 checkpoint loads by name and LoRA adapter keys line up with PEFT's. GPT-2 stores its
projections as Conv1D, i.e. weight of shape (in, out); minilora uses nn.Linear, (out, in), and transposes
on load and save.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpointing import checkpoint_sequential


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


class CausalSelfAttention(nn.Module):
    """softmax(Q Kᵀ / √hs + causal mask) V over n_head heads, then the output projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
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
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """c_proj(GELU(c_fc(x))), 4x wide, with GPT-2's tanh approximation of GELU."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
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
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
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
                logits = logits / temperature
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

    # ----- GPT-2 checkpoints (Hugging Face layout: config.json + model.safetensors) -----

    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "GPT":
        """Load a local Hugging Face GPT-2 directory, transposing GPT-2's Conv1D weights (in, out) -> (out, in)."""
        from safetensors.torch import load_file

        path = Path(path)
        for f in ("config.json", "model.safetensors"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"from_pretrained: {path / f} not found (expected a GPT-2 directory)")
        hf = json.loads((path / "config.json").read_text())
        names = {f.name for f in fields(GPTConfig)}
        cfg = dict(block_size=hf.get("n_positions", hf.get("block_size", 1024)), vocab_size=hf["vocab_size"],
                   n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                   layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        cfg.update({k: v for k, v in hf.get("minilora", {}).items() if k in names})
        cfg.update(overrides)
        model = cls(GPTConfig(**cfg))
        sd = load_file(str(path / "model.safetensors"))
        sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in sd.items()}
        own = model.state_dict()
        for key, value in sd.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers of older checkpoints; lm_head is tied to wte
            if key not in own:
                raise KeyError(f"from_pretrained: unexpected key {key!r} in {path / 'model.safetensors'}")
            if key.endswith(cls.CONV1D):
                value = value.t()
            if value.shape != own[key].shape:
                raise ValueError(f"from_pretrained: {key} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(own[key].shape)}")
            with torch.no_grad():
                own[key].copy_(value)
        missing = [k for k in own if k != "lm_head.weight" and k not in sd]
        if missing:
            raise KeyError(f"from_pretrained: {path} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json + model.safetensors in GPT-2's layout (Conv1D weights transposed back), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        c = self.config
        sd = {}
        for key, value in self.state_dict().items():
            if key == "lm_head.weight":
                continue
            value = value.detach().cpu()
            sd[key] = (value.t() if key.endswith(self.CONV1D) else value).contiguous()
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                  n_head=c.n_head, layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new",
                  tie_word_embeddings=True, minilora=asdict(c))
        tmp = path / "model.safetensors.tmp"
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / "model.safetensors")
        tmp = path / "config.json.tmp"
        tmp.write_text(json.dumps(hf, indent=2))
        os.replace(tmp, path / "config.json")
