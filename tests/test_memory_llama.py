"""The real models' memory: Llama presets with exact parameter counts, and the Llama activation walk against a
measured training step."""
import pytest
import torch

from minilora import add_lora, add_qlora
from minilora.llama import Llama, LlamaConfig
from minilora.memory import measure
from minilora.memory.activations import ActivationSetup, itemsize
from minilora.memory.llama import LLAMA_LINEARS, LLAMA_TARGETS, PRESETS, llama_param_count, saved_activations_llama

B, T, R = 2, 24, 4
# the published counts: Llama-2-7B, LLaMA-65B and Llama-2-70B as the issue states them, Llama-3-8B's model card
COUNTS = {"llama-2-7b": 6_738_415_616, "llama-65b": 65_285_660_672, "llama-2-70b": 68_976_648_192,
          "llama-3-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_preset_parameter_counts_are_exact(name):
    config = LlamaConfig(**PRESETS[name])
    with torch.device("meta"):
        model = Llama(config)
    assert llama_param_count(config) == sum(p.numel() for p in model.parameters()) == COUNTS[name]


def test_param_count_with_tied_head_and_biases():
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                         o_proj_bias=False)
    assert llama_param_count(config) == sum(p.numel() for p in Llama(config).parameters())


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_activation_walk_matches_a_measured_step(mode, kv, dtype, ckpt):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
                         gradient_checkpointing=ckpt)
    model = Llama(config).to(dtype)
    if mode == "lora":
        add_lora(model, LLAMA_TARGETS, r=R)
    if mode == "qlora":
        add_qlora(model, LLAMA_TARGETS, r=R, compute_dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    idx, targets = torch.randint(0, 131, (B, T)), torch.randint(0, 131, (B, T))
    got = measure(model, opt, (idx, targets))
    kind = {"full": "trained", "lora": "lora", "qlora": "qlora"}[mode]
    setup = ActivationSetup(batch_size=B, seq_len=T, kinds=[dict.fromkeys(LLAMA_LINEARS, kind)] * 3,
                            head_kind="trained" if mode == "full" else "frozen", embeddings_trained=mode == "full",
                            norms_trained=mode == "full", act=itemsize(dtype),
                            adapter=itemsize(dtype) if mode == "lora" else 2, compute=2, r=R, device="cpu")
    assert saved_activations_llama(config, setup, None if ckpt else False).peak == got.activations
