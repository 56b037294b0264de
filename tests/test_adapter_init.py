import copy
import json

import pytest
import torch

from adapter_checks import perturb, rel_err
from minilora import (GPT, add_lora, add_qlora, dequantize_nf4, load_adapter, load_qlora_adapter, lora_layers,
                      quantize_nf4, save_adapter)

peft = pytest.importorskip("peft", reason="peft (dev extra) is the reference for PiSSA")

TARGETS = ["c_attn", "c_fc", "attn.c_proj"]


def test_pissa_equals_peft_initialisation_and_files_go_both_ways(hf_gpt2_dir, tmp_path):
    path, hf = hf_gpt2_dir
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 101, (2, 14))
    with torch.no_grad():
        before = ours(idx)
    add_lora(ours, TARGETS, r=4, alpha=8, init="pissa")
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*\.(c_attn|c_fc|attn\.c_proj)", init_lora_weights="pissa",
        fan_in_fan_out=True)).eval()
    for name, layer in lora_layers(ours).items():  # singular vectors move with the SVD's rounding: 1e-4 for them
        other = theirs.base_model.model.get_submodule(name)
        assert rel_err(layer.lora_A, other.lora_A["default"].weight) < 1e-4
        assert rel_err(layer.lora_B, other.lora_B["default"].weight) < 1e-4
        assert rel_err(layer.base_layer.weight, other.base_layer.weight.t()) < 1e-5  # W_res (Conv1D is in × out)
        # the residual lost the principal part: its largest singular value is W's (r+1)-th
        w = layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
        sv = torch.linalg.svdvals(w.detach())
        assert torch.linalg.svdvals(layer.base_layer.weight)[0].item() == pytest.approx(sv[4].item(), rel=1e-4)
    with torch.no_grad():
        assert rel_err(ours(idx), before) < 1e-5  # PiSSA starts as the model it was made from
    perturb(ours)
    save_adapter(ours, tmp_path / "pissa")
    assert json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "pissa").eval()  # onto the original W
    with torch.no_grad():
        trained = ours(idx)
        assert rel_err(trained, loaded(input_ids=idx).logits) < 1e-5
        assert rel_err(trained, before) > 1e-3
    loaded.save_pretrained(tmp_path / "peft")
    back = load_adapter(GPT.from_pretrained(path).eval(), tmp_path / "peft")
    with torch.no_grad():
        assert rel_err(back(idx), trained) < 1e-5


def layer_errors(model, weights):
    """name -> ‖W − (deq(Q) + s·B A)‖ for each QLoRA layer (B A = 0 for plain QLoRA)."""
    out = {}
    for name, layer in lora_layers(model).items():
        approx = layer.base_layer.dequantized_weight(torch.float32) + layer.delta_weight()
        out[name] = (weights[name] - approx).norm().item()
    return out


def test_loftq_beats_plain_nf4_on_every_layer_and_improves_with_iterations(tiny_config):
    torch.manual_seed(1)
    tiny_config.n_embd = 64
    base = GPT(tiny_config)
    names = [n for n, m in base.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    weights = {n: base.get_submodule(n).weight.detach().float().clone() for n in names}
    plain = add_qlora(copy.deepcopy(base), names, r=8, alpha=16, compute_dtype=torch.float32)
    nf4 = layer_errors(plain, weights)
    errors = []
    for it in range(1, 6):
        m = add_qlora(copy.deepcopy(base), names, r=8, alpha=16, compute_dtype=torch.float32, init="loftq",
                      loftq_iter=it)
        errors.append(layer_errors(m, weights))
        if it == 1:  # one round: Q is plain NF4 of W, byte for byte, and s·B A the best rank-r fix of its error
            for name, layer in lora_layers(m).items():
                assert torch.equal(layer.base_layer.packed, lora_layers(plain)[name].base_layer.packed)
                sv = torch.linalg.svdvals(weights[name] - layer.base_layer.dequantized_weight(torch.float32))
                assert errors[0][name] == pytest.approx(sv[8:].norm().item(), rel=1e-4)
    for name in names:
        assert errors[-1][name] <= 0.97 * nf4[name], (name, errors[-1][name] / nf4[name])
        assert all(errors[i + 1][name] < errors[i][name] for i in range(4)), (name, [e[name] for e in errors])


def test_loftq_and_qpissa_adapters_reload_from_the_original_base(tiny_gpt, tmp_path):
    idx = torch.randint(0, 97, (2, 8))
    for init in ("loftq", "pissa"):
        model = add_qlora(copy.deepcopy(tiny_gpt), ["c_attn", "c_fc"], r=4, compute_dtype=torch.float32,
                          init=init, loftq_iter=2)
        perturb(model, seed=5)
        save_adapter(model, tmp_path / init)
        config = json.loads((tmp_path / init / "adapter_config.json").read_text())
        assert config["init_lora_weights"] == init
        if init == "loftq":
            assert config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
        again = load_qlora_adapter(copy.deepcopy(tiny_gpt), tmp_path / init)
        with torch.no_grad():
            assert torch.equal(again.eval()(idx), model.eval()(idx))


def test_qpissa_quantizes_a_residual_with_less_error_than_w():
    torch.manual_seed(0)
    # a weight with a few strong directions, as trained weights have: PiSSA moves them out of the 4-bit base
    w = torch.randn(96, 8) @ torch.randn(8, 128) * 0.3 + 0.02 * torch.randn(96, 128)
    lin = torch.nn.Linear(128, 96)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = add_qlora(torch.nn.Sequential(lin), ["0"], r=8, alpha=8, compute_dtype=torch.float32, init="pissa")
    layer = model[0]
    qpissa = (w - layer.base_layer.dequantized_weight(torch.float32) - layer.delta_weight()).norm()
    plain = (w - dequantize_nf4(quantize_nf4(w), torch.float32)).norm()
    assert qpissa < 0.5 * plain
