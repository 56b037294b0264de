"""QLoRA: a frozen base weight stored as NF4 with double quantization, plus LoRA adapters in a compute dtype.

    Y = X · doubleDequant(c1, c2, W_nf4)ᵀ + scaling · (X · Aᵀ) · Bᵀ (+ bias)

The NF4 layer and its matmul live in nf4_linear.py; here are the adapter layer on top of it (QLoRALinear) and
the model-level steps: quantize_model, add_qlora (quantize, then add_lora), load_qlora_adapter, merge_qlora.
add_qlora(..., init="pissa" | "loftq") chooses the 4-bit base and the adapter's start together (variants/lora_init.py).
bits=2 stores the base as NF2 instead (quant/nf2.py: four levels, 2.127 bits per weight), for PiSSA and LoftQ too.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from .adapters import base_bits, load_adapter, read_adapter_config
from .inject import (set_submodule, add_lora, all_or_nothing, find_targets, fold_adapter, lora_layers, parameter_uses,
                     register_lora_wrapper, untie_lora_bases)
from .lora import LoRALinear
from .multi.mixed_batch import mixed_batch_forward
from .nf4_linear import NF4Linear, nf4_linear
from .variants.lora_init import quantized_start, set_adapter_start

QLORA_INITS = ("kaiming", "gaussian", "pissa", "loftq")
LATER = ("pissa", "loftq")  # inits that choose the NF4 base too: A and B are set after quantizing


class QLoRALinear(LoRALinear):
    """A frozen NF4 base (NF4Linear) plus trainable LoRA adapters, trained through nf4_linear's autograd function.

    It keeps LoRALinear's contract: merge() folds the update in, so forward is one dense matmul, and unmerge()
    undoes it exactly. 4-bit codes cannot absorb ΔW in place (W0 + ΔW needs a new quantization), so merge()
    builds `merged_linear`, a dense nn.Linear holding deq(W) + scaling·B·A in the original dtype, which forward
    uses while merged; the NF4 weight is kept, and unmerge() drops the dense copy. merge_qlora(model) puts the
    dense layer (or, with requantize, its NF4 quantization) in this layer's place.
    """

    def __init__(self, base: NF4Linear, *args, **kwargs):
        super().__init__(base, *args, **kwargs)
        self.merged_linear = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
                    use_rslora: bool = False, init: str = "kaiming", bits: int = 4) -> "QLoRALinear":
        """Quantize linear to NF4 (bits=2: NF2) with double quantization and attach rank-r adapters in compute_dtype."""
        base = NF4Linear.from_linear(linear, blocksize=blocksize, compute_dtype=compute_dtype, backend=backend,
                                     bits=bits)
        return cls(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:  # a mixed batch: each example names its adapter (multi/)
            return mixed_batch_forward(self, x)
        if self.disabled:
            return self.base_layer(x)
        if self.merged:
            if not x.is_floating_point():
                raise TypeError(f"input must be a floating-point tensor (as for nn.Linear), got {x.dtype}")
            return self.merged_linear(x.to(self.merged_linear.weight.dtype)).to(x.dtype)
        x_lora = self.lora_dropout(x) if self.training and not isinstance(self.lora_dropout, nn.Identity) else None
        return nf4_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling, x_lora)

    @torch.no_grad()
    def merge(self) -> None:
        """W = deq(W_nf4) + scaling · B A, as the dense merged_linear that forward uses until unmerge()."""
        if self.merged:
            raise RuntimeError("QLoRALinear.merge: adapter is already merged (call unmerge() first)")
        self.merged_linear = self.base_layer.to_linear(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Back to deq(W_nf4) + the adapter path: the dense copy goes, the NF4 weight was never changed."""
        if not self.merged:
            raise RuntimeError("QLoRALinear.unmerge: adapter is not merged")
        self.merged_linear = None
        self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """deq(W) + scaling · B A in fp32."""
        return self.base_layer.dequantized_weight(torch.float32) + self.delta_weight()

    def merged_layer(self) -> nn.Module:
        """An nn.Linear holding deq(W) + scaling·B·A."""
        if not self.merged:
            self.merge()
        return self.merged_linear

    @torch.no_grad()
    def fold_requantized(self) -> float:
        """W0 <- Q(deq(W0) + ΔW): the mounted adapter folded into a new quantized base (NF4, or NF2 as W0 was),
        under the adapters this layer carries besides it. Returns the rounding error ‖deq(Q(W)) − W‖ / ‖W‖."""
        w = self.merged_weight()
        self.base_layer = requantized(self.base_layer, self.base_layer.to_linear(w))
        return ((self.base_layer.dequantized_weight(torch.float32) - w).norm() / w.norm()).item()


def requantized(base: NF4Linear, linear: nn.Linear) -> NF4Linear:
    """linear quantized in base's format: its bits, blocksize, double quantization, compute dtype and backend."""
    return NF4Linear.from_linear(linear, blocksize=base._state.blocksize, double_quant=base._state.double_quant,
                                 compute_dtype=base.compute_dtype, backend=base.backend, bits=base.bits)


register_lora_wrapper(NF4Linear, QLoRALinear)


def untied_linears(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """The nn.Linear modules among names (default: all) whose weight no other module shares. A tied lm_head
    shares its weight with the token embedding, which must stay a plain matrix for the lookup, so QLoRA (like
    bitsandbytes) leaves it unquantized; an adapter on it trains on the full-precision weight."""
    uses = parameter_uses(model)
    if names is None:
        names = [n for n, _ in model.named_modules()]
    return [n for n in names if type(model.get_submodule(n)) is nn.Linear
            and uses[id(model.get_submodule(n).weight)] == 1]


def quantize_model(model: nn.Module, targets: str | list[str] | None = None, blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                   backend: str = "auto", bits: int = 4) -> nn.Module:
    """Replace the target nn.Linear layers (default: every nn.Linear whose weight is not shared, e.g. not a
    tied lm_head) by frozen NF4Linear layers, in place (bits=2: NF2 weights). add_lora on the result gives QLoRA."""
    names = untied_linears(model) if targets is None else find_targets(model, targets)
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise TypeError(f"quantize_model: target {name!r} is a {type(module).__name__}, not an nn.Linear")
    for name in names:
        module = model.get_submodule(name)
        set_submodule(model, name, NF4Linear.from_linear(module, blocksize=blocksize, double_quant=double_quant,
                                                          compute_dtype=compute_dtype, backend=backend, bits=bits))
    return model


def _quantizable(model: nn.Module, targets, caller: str) -> list[str]:
    """The targets QLoRA quantizes: the untied nn.Linear among them; refuses when that is none of them."""
    names = find_targets(model, targets)
    quantized = untied_linears(model, names)
    if not quantized:
        raise ValueError(f"{caller}: none of the targets {names} is an nn.Linear with its own weight to quantize "
                         f"(a tied lm_head stays in full precision); use plain LoRA (add_lora / load_adapter)")
    return quantized


def quantize_with_init(model: nn.Module, names: list[str], init: str, r: int, scaling: float, loftq_iter: int,
                       blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                       bits: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """quantize_model as PiSSA or LoftQ choose the 4-bit base (variants/lora_init.py); returns name -> (A, B), the
    adapter's start."""
    starts = {}
    for name in names:
        nf4, a, b = quantized_start(model.get_submodule(name), init, r, scaling, loftq_iter, blocksize, double_quant,
                                    compute_dtype, bits)
        set_submodule(model, name, nf4)
        starts[name] = a, b
    return starts


def add_qlora(model: nn.Module, targets: str | list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
              blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
              use_rslora: bool = False, use_dora: bool = False, init: str | None = "kaiming", loftq_iter: int = 1,
              bits: int = 4) -> nn.Module:
    """QLoRA in one call (in place): the untied nn.Linear among targets become frozen NF4 (quantize_model), then
    every target gets rank-r adapters (add_lora); a tied lm_head among them keeps its full-precision weight
    under a plain LoRA adapter. use_dora: DoRA over the NF4 base. init="pissa": the residual W − s·B A is what
    gets quantized (QPiSSA); init="loftq": NF4 and the adapter alternate loftq_iter times so that
    deq(Q) + s·B A ≈ W (LoftQ). bits=2: the base (and LoftQ's quantizer) is NF2. On an error the model is left
    as it was. init=None is the default start (kaiming)."""
    init = "kaiming" if init is None else init
    if init not in QLORA_INITS:
        raise ValueError(f"init must be one of {QLORA_INITS}, got {init!r}")
    if isinstance(loftq_iter, bool) or not isinstance(loftq_iter, int) or loftq_iter < 1:
        raise ValueError(f"loftq_iter must be an int >= 1, got {loftq_iter!r}")
    names = find_targets(model, targets)
    quantized = _quantizable(model, targets, "add_qlora")
    with all_or_nothing(model, names):
        if init in LATER:
            scaling = LoRALinear.scaling_for(r, alpha, use_rslora)
            starts = quantize_with_init(model, quantized, init, r, scaling, loftq_iter, blocksize, double_quant,
                                        compute_dtype, bits)
        else:
            starts = {}
            quantize_model(model, quantized, blocksize=blocksize, double_quant=double_quant,
                           compute_dtype=compute_dtype, bits=bits)
        kw = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
        add_lora(model, [re.escape(n) for n in quantized], init="kaiming" if init in LATER else init, **kw)
        dense = [re.escape(n) for n in names if n not in quantized]  # a tied lm_head: LoftQ has nothing to fix
        if dense:
            add_lora(model, dense, init="kaiming" if init == "loftq" else init, **kw)
        set_adapter_start(model, starts, init, loftq_iter)
    return model


def load_qlora_adapter(model: nn.Module, adapter_dir, compute_dtype: torch.dtype = torch.float32,
                       adapter_name: str = "default", bits: int | None = None) -> nn.Module:
    """A saved adapter on an NF4 base (in place): quantize the untied nn.Linear among the adapter's
    target_modules (as PiSSA or LoftQ did, when its init_lora_weights says so), then load_adapter. The base is NF2
    when the config says 2 bits (quantized_base_bits, LoftQ's loftq_bits) or bits=2 is given. On an error the
    model is left as it was."""
    config = read_adapter_config(adapter_dir)
    bits = base_bits(config, adapter_dir, bits)
    quantized = _quantizable(model, config["target_modules"], "load_qlora_adapter")
    init = config.get("init_lora_weights")
    with all_or_nothing(model, quantized):
        if init in ("pissa", "loftq"):
            r, alpha, rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
            if config.get("rank_pattern") or config.get("alpha_pattern"):
                raise ValueError(f"load_qlora_adapter: {adapter_dir}: {init} with rank_pattern / alpha_pattern is "
                                 f"not supported")
            iters = (config.get("loftq_config") or {}).get("loftq_iter", 1)
            quantize_with_init(model, quantized, init, r, LoRALinear.scaling_for(r, alpha, rslora), iters,
                               compute_dtype=compute_dtype, bits=bits)
        else:
            quantize_model(model, quantized, compute_dtype=compute_dtype, bits=bits)
        load_adapter(model, adapter_dir, adapter_name=adapter_name)
    return model


def merge_qlora(model: nn.Module, requantize: bool = False, adapter_name: str | None = None
                ) -> tuple[nn.Module, dict[str, float]]:
    """Fold each QLoRA adapter into its dequantized base (in place); the result is a dense model. With
    requantize the merged weights (and the quantized layers without an adapter) stay NF4; the report maps layer
    name -> relative rounding error ‖Q(W) − W‖ / ‖W‖ of that step. An adapter on a tied lm_head (kept in full
    precision) gets its own merged matrix, as in merge_lora: the embedding keeps W0. With adapter_name (and
    requantize), only that adapter is folded in, W0 <- Q(deq(W0) + ΔW); the other adapters stay, on the new base."""
    report = {}
    if adapter_name is not None and not requantize:
        raise ValueError("merge_qlora(adapter_name=...) needs requantize=True: the other adapters stay on a quantized base")
    untie_lora_bases(model)

    def fold(name, layer):  # W0 <- Q(deq(W0) + ΔW); a tied lm_head keeps its dense W0 + ΔW, as in merge_lora
        if isinstance(layer, QLoRALinear):
            report[name] = layer.fold_requantized()
        else:
            layer.merge()
    if adapter_name is not None:
        return fold_adapter(model, adapter_name, fold, "merge_qlora"), report
    if not requantize:  # a dequantized model: quantized layers without an adapter become dense too
        for name, module in list(model.named_modules()):
            if isinstance(module, NF4Linear) and not name.endswith(".base_layer"):
                set_submodule(model, name, module.to_linear())
    for name, layer in lora_layers(model).items():
        if requantize and isinstance(layer, QLoRALinear):
            fold(name, layer)
            set_submodule(model, name, layer.base_layer)
        else:
            set_submodule(model, name, layer.merged_layer())
    return model, report
