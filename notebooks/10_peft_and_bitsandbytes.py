# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 · The same steps with PEFT, bitsandbytes and transformers
#
# minilora writes every idea out so that it can be read. The libraries a fine-tuning project uses next —
# Hugging Face **transformers** (the models), **PEFT** (`LoraConfig`, `get_peft_model`, `merge_and_unload`) and
# **bitsandbytes** (NF4 with double quantization, through `BitsAndBytesConfig`) — do the same things, and
# minilora's files are theirs: a saved minilora GPT is a GPT-2 checkpoint, a saved adapter is a PEFT adapter,
# an NF4 weight has bitsandbytes' bytes. This notebook runs each step both ways on a tiny model and asserts
# that they agree:
#
# 1. the base model: minilora's `save_pretrained` opened by `transformers.GPT2LMHeadModel` — the same logits;
# 2. LoRA: the same adapter, three AdamW steps in minilora and in PEFT — the same losses, the same adapter file,
#    the same merged model (`merge_lora` against `merge_and_unload`);
# 3. NF4: minilora's `quantize_nf4` against `bitsandbytes.functional.quantize_4bit` — the same bytes, in fp32
#    and in bf16;
# 4. QLoRA's base: transformers with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
#    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...)` against minilora's `quantize_model` — the same
#    stored bytes, and logits that agree to bf16 rounding.
#
# The three libraries come with minilora's `dev` extra (`pip install -e ".[dev]"`). Without them the notebook
# says what is missing and what the steps would show, and skips them.

# %%
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from minilora import GPT, GPTConfig, add_lora, lora_layers, merge_lora, quantize_model, save_adapter
from minilora.quant import dequantize_nf4, nf4_code, quantize_nf4, to_bnb_state_dict

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    import peft
    import transformers
    HAVE_LIBS = True
    print(f"transformers {transformers.__version__}, PEFT {peft.__version__}, bitsandbytes {bnb.__version__}")
except ImportError as err:
    HAVE_LIBS = False
    print(f"missing: {err.name} — install minilora's dev extra (pip install -e '.[dev]') to run this notebook's "
          "comparisons. They would show minilora's GPT, LoRA adapter and NF4 bytes equal to transformers', PEFT's "
          "and bitsandbytes'. Every cell below is skipped.")
if HAVE_LIBS:
    torch._dynamo.config.disable = True   # bitsandbytes wraps its CPU code in torch.compile: eager is the same arithmetic
work = Path(tempfile.mkdtemp())

# %% [markdown]
# ## 1 · The base model: minilora's GPT is a GPT-2 checkpoint
#
# `GPT.save_pretrained` writes `config.json` and `model.safetensors` in GPT-2's layout; transformers opens the
# folder as a `GPT2LMHeadModel`. Dropout is switched off in both (minilora's GPT has none; GPT-2's config turns it
# on by default), so that training steps can be compared too. The logits agree to float32 rounding (1e-5):

# %%
torch.manual_seed(0)
ours = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=128)).eval()
ours.save_pretrained(work / "base")
idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
if HAVE_LIBS:
    NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel.from_pretrained(work / "base", **NO_DROPOUT).eval()
    with torch.no_grad():
        base_gap = (ours(idx) - hf(input_ids=idx).logits).abs().max().item()
    print(f"files: {sorted(p.name for p in (work / 'base').iterdir())}; max |minilora − transformers| logits: {base_gap:.1e}")
    assert base_gap < 1e-5, f"claim broke: the same logits ({base_gap:.1e})"

# %% [markdown]
# ## 2 · LoRA: minilora's step and PEFT's step
#
# minilora: `add_lora(model, ["c_attn", "c_fc"], r=4, alpha=8)`. PEFT: `LoraConfig(r=4, lora_alpha=8,
# target_modules=["c_attn", "c_fc"])` and `get_peft_model`. Both start B at zero, so to compare a training step
# that moves A too, B gets the same random start in both: minilora saves its adapter (`adapter_config.json` +
# `adapter_model.safetensors`, PEFT's format) and PEFT loads it for training. Then three AdamW steps each on the
# same batch: the losses agree at every step (to 1e-5), and so do the saved adapter files, tensor by tensor (same
# names, values to 1e-4: Adam divides by the square root of tiny second moments, which magnifies float32 rounding
# in the gradients), and the logits (1e-5).

# %%
if HAVE_LIBS:
    add_lora(ours, ["c_attn", "c_fc"], r=4, alpha=8)
    g = torch.Generator().manual_seed(2)
    for layer in lora_layers(ours).values():
        with torch.no_grad():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g))
    save_adapter(ours, work / "start")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0)
    fresh = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(work / "base", **NO_DROPOUT), config)
    print("get_peft_model with the same LoraConfig:", end=" ")
    fresh.print_trainable_parameters()
    theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(work / "base", **NO_DROPOUT),
                                            work / "start", is_trainable=True)
    saved_config = json.loads((work / "start" / "adapter_config.json").read_text())
    print("minilora's adapter_config.json:", {k: saved_config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules")})
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_ours == n_theirs == sum(p.numel() for p in fresh.parameters() if p.requires_grad), \
        "claim broke: the same trainable parameters"

    ours.train(), theirs.train()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(3):
        # minilora takes inputs and targets; transformers takes labels and shifts them by one itself
        loss_ours = ours(idx[:, :-1], idx[:, 1:])[1]
        loss_theirs = theirs(input_ids=idx, labels=idx).loss
        losses.append((loss_ours.item(), loss_theirs.item()))
        for opt, loss in ((opt_ours, loss_ours), (opt_theirs, loss_theirs)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    print("losses (minilora, PEFT):", [(round(a, 6), round(b, 6)) for a, b in losses])
    assert all(abs(a - b) < 1e-5 for a, b in losses), "claim broke: the same loss at every step"

    ours.eval(), theirs.eval()
    save_adapter(ours, work / "ours")
    theirs.save_pretrained(work / "theirs")
    a_file = load_file(work / "ours" / "adapter_model.safetensors")
    b_file = load_file(work / "theirs" / "adapter_model.safetensors")
    file_gap = max((a_file[k] - b_file[k]).abs().max().item() for k in a_file)
    with torch.no_grad():
        lora_gap = (ours(idx) - theirs(input_ids=idx).logits).abs().max().item()
    print(f"adapter files: {len(a_file)} tensors each, same names: {set(a_file) == set(b_file)}, "
          f"largest difference {file_gap:.1e}; logits after training: {lora_gap:.1e}")
    assert set(a_file) == set(b_file) and file_gap < 1e-4, "claim broke: the same adapter file"
    assert lora_gap < 1e-5, "claim broke: the same logits after the same steps"

# %% [markdown]
# Merging: minilora's `merge_lora` folds W0 + (α/r)·B·A into plain layers; PEFT's `merge_and_unload` does the same
# and returns the plain transformers model. The merged models agree (1e-5), and the merged minilora model saves as
# a GPT-2 checkpoint again, which transformers opens with the same logits.

# %%
if HAVE_LIBS:
    merged_theirs = theirs.merge_and_unload()
    merge_lora(ours)
    ours.save_pretrained(work / "merged")
    reopened = transformers.GPT2LMHeadModel.from_pretrained(work / "merged").eval()
    with torch.no_grad():
        ref = ours(idx)
        merged_gap = (ref - merged_theirs(input_ids=idx).logits).abs().max().item()
        reopened_gap = (ref - reopened(input_ids=idx).logits).abs().max().item()
    print(f"{type(merged_theirs).__name__} after merge_and_unload; max |merged minilora − merged PEFT| = {merged_gap:.1e}; "
          f"merged minilora saved and reopened by transformers: {reopened_gap:.1e}")
    assert merged_gap < 1e-5 and reopened_gap < 1e-5, "claim broke: the merged models agree"

# %% [markdown]
# ## 3 · NF4 with double quantization: the same bytes as bitsandbytes
#
# bitsandbytes' `quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")` is QLoRA's NF4 with
# double quantization. minilora's `quantize_nf4` gives the same packed codes, the same 8-bit block constants, the
# same offset and fp32 group constants — equal bit for bit — for fp32 and for bf16 weights, and the same
# dequantized values. The 16 levels are bitsandbytes' table (notebook 2 derives it).

# %%
if HAVE_LIBS:
    W = torch.randn(256, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    assert torch.equal(bnbF.get_4bit_type("nf4", device="cpu").float(), nf4_code()), "claim broke: the same NF4 table"
    for dtype in (torch.float32, torch.bfloat16):
        packed, qs = bnbF.quantize_4bit(W.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
        st = quantize_nf4(W.to(dtype), blocksize=64, double_quant=True)
        same = {"codes": torch.equal(st.packed, packed.view(-1)), "absmax (8-bit)": torch.equal(st.absmax, qs.absmax),
                "offset": torch.equal(st.offset, qs.offset), "group constants": torch.equal(st.nested_absmax, qs.state2.absmax),
                "dequantized": torch.equal(dequantize_nf4(st), bnbF.dequantize_4bit(packed, qs))}
        print(f"{str(dtype):<15} equal: {same}; {st.nbytes:,} bytes, {st.bits_per_param:.3f} bits per weight")
        assert all(same.values()), f"claim broke: bit for bit the same as bitsandbytes ({dtype})"

# %% [markdown]
# ## 4 · QLoRA's base through transformers: `BitsAndBytesConfig`
#
# The usual way to get QLoRA's frozen base is to let transformers quantize while it loads:
# `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
# bnb_4bit_compute_dtype=torch.bfloat16)`. Every linear layer of the blocks becomes a bitsandbytes `Linear4bit`.
# minilora's `quantize_model` does the same to minilora's GPT. Loaded from the checkpoint saved in section 1:
#
# - the stored 4-bit weights are the same bytes: every tensor of minilora's `to_bnb_state_dict` equals the
#   corresponding tensor of transformers' state dict (codes, constants and bitsandbytes' JSON of the quantization
#   state), for every quantized layer;
# - the logits agree to under 1 % of their size, whether fp32 or bf16 compute is asked for — not bit for bit.
#   The stored bytes being equal, the gap comes from the compute: on this CPU bitsandbytes' 4-bit matmul does not
#   reproduce minilora's fp32 dequantize-then-matmul exactly, and differs from it by about bf16's rounding
#   (unit roundoff 2⁻⁸ ≈ 0.4 %) even when fp32 compute is asked for.

# %%
if HAVE_LIBS:
    def hf_4bit(compute_dtype):
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=compute_dtype)
        return transformers.GPT2LMHeadModel.from_pretrained(work / "base", quantization_config=cfg, device_map="cpu",
                                                            **NO_DROPOUT).eval()

    def ours_4bit(compute_dtype):
        return quantize_model(GPT.from_pretrained(work / "base"), compute_dtype=compute_dtype).eval()

    theirs4, ours4 = hf_4bit(torch.float32), ours_4bit(torch.float32)
    first = theirs4.transformer.h[0].attn.c_attn
    print(f"transformers' layer: {type(first).__module__}.{type(first).__name__}")
    hf_sd = theirs4.state_dict()
    layers = [n for n, m in ours4.named_modules() if hasattr(m, "quant_state")]
    mismatched = []
    for name in layers:
        for key, value in to_bnb_state_dict(ours4.get_submodule(name).quant_state(), prefix=f"{name}.weight").items():
            if not (key in hf_sd and hf_sd[key].dtype == value.dtype and torch.equal(hf_sd[key].flatten(), value.flatten())):
                mismatched.append(key)
    print(f"{len(layers)} quantized layers; tensors that differ from transformers' 4-bit state dict: {mismatched}")
    assert layers and not mismatched, "claim broke: the same stored bytes as transformers + bitsandbytes"

    gaps = {}
    for dtype in (torch.float32, torch.bfloat16):
        t4, o4 = (theirs4, ours4) if dtype == torch.float32 else (hf_4bit(dtype), ours_4bit(dtype))
        with torch.no_grad():
            a, b = o4(idx).float(), t4(input_ids=idx).logits.float()
        gaps[dtype] = ((a - b).abs().max().item(), ((a - b).norm() / b.norm()).item())
        print(f"compute {str(dtype):<15}: max |minilora − transformers| logits {gaps[dtype][0]:.1e}, relative {gaps[dtype][1]:.2e}")
    assert all(rel < 0.01 for _, rel in gaps.values()), "claim broke: the logits agree to bf16 rounding (under 1 %)"

# %% [markdown]
# ## Exercises
#
# 1. *Code it:* write the `LoraConfig` that matches `add_lora(model, ["c_attn"], r=8, alpha=32)` in
#    `my_lora_config()` (return a `peft.LoraConfig`). The check builds both on the tiny GPT-2 above, gives them the
#    same adapter weights (through minilora's saved adapter) and compares their logits once it returns something.
# 2. *Code it:* write the `BitsAndBytesConfig` for QLoRA's base — NF4, double quantization, bf16 compute — in
#    `my_bnb_config()`. The check compares the fields that decide the stored bytes and the compute dtype.

# %%
def my_lora_config():
    """Exercise 1: return peft.LoraConfig(...) (replace the `return None`)."""
    return None


def my_bnb_config():
    """Exercise 2: return transformers.BitsAndBytesConfig(...) (replace the `return None`)."""
    return None


# %%
if not HAVE_LIBS:
    print("the exercises need the dev extra (PEFT, transformers, bitsandbytes)")
else:
    mine = my_lora_config()
    if mine is None:
        print("fill in my_lora_config")
    else:
        ref_model = add_lora(GPT.from_pretrained(work / "base"), ["c_attn"], r=8, alpha=32).eval()
        for layer in lora_layers(ref_model).values():
            with torch.no_grad():
                layer.lora_B.normal_(std=0.05)
        save_adapter(ref_model, work / "exercise")
        yours = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(work / "base", **NO_DROPOUT), mine)
        peft.set_peft_model_state_dict(yours, load_file(work / "exercise" / "adapter_model.safetensors"))
        with torch.no_grad():
            same = torch.allclose(ref_model(idx), yours.eval()(input_ids=idx).logits, atol=1e-4)
        assert same, "my_lora_config does not give add_lora's layer yet; try again"
        print("my_lora_config: right")
    mine = my_bnb_config()
    if mine is None:
        print("fill in my_bnb_config")
    else:
        assert mine.load_in_4bit and mine.bnb_4bit_quant_type == "nf4" and mine.bnb_4bit_use_double_quant, \
            "my_bnb_config: not NF4 with double quantization yet; try again"
        assert mine.bnb_4bit_compute_dtype == torch.bfloat16, "my_bnb_config: the compute dtype is not bf16 yet; try again"
        print("my_bnb_config: right")
