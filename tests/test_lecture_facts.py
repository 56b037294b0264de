"""Facts the lecture notebooks state that hold by definition or by theorem: shapes, dtypes, format constants,
the estimator's own arithmetic, what bitsandbytes' source says. A notebook's asserts are for claims a run could
make false; these cannot be false in a run, so they are checked once here. Tiny tensors; a few seconds in all."""
import inspect
import math

import pytest
import torch
import torch.nn as nn

from minilora import (LoRALinear, PagedAdamW, QLoRALinear, lora_params_real, segment_bounds, slide_table)
from minilora.memory import GB, estimate, gpt_param_count, nf4_nbytes, scaled_config
from minilora.params import linear_shapes_llama
from minilora.quant import (dequantize_affine, double_quantize_int8, error_table, dequantize_nf4, quantize_affine,
                            quantize_int8, quantize_nf4)


def test_lora_layer_shapes_zero_B_and_scaling():
    lora = LoRALinear(nn.Linear(128, 512), r=8, alpha=16)
    assert tuple(lora.lora_A.shape) == (8, 128) and tuple(lora.lora_B.shape) == (512, 8)
    assert bool((lora.lora_B == 0).all()) and lora.lora_A.unique().numel() > 0.99 * lora.lora_A.numel()
    assert lora.scaling == 16 / 8
    assert LoRALinear(nn.Linear(64, 64), r=16, alpha=16, use_rslora=True).scaling == 16 / math.sqrt(16)


def test_kaiming_uniform_A_has_std_one_over_sqrt_3_in():
    torch.manual_seed(0)
    A = LoRALinear(nn.Linear(256, 256), r=64).lora_A
    bound = 1 / math.sqrt(256)
    assert A.abs().max() <= bound and abs(A.std().item() - bound / math.sqrt(3)) < 0.1 * bound


def test_bf16_base_gives_bf16_adapters_and_output():
    lora = LoRALinear(nn.Linear(16, 8), r=2).to(torch.bfloat16)
    assert lora.lora_A.dtype == lora(torch.randn(3, 16).bfloat16()).dtype == torch.bfloat16


def test_rank_r_matrix_is_exactly_B_A_and_svd_is_the_best_rank_k_product():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 60, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    assert torch.linalg.matrix_rank(M) == 5 and torch.allclose((U[:, :5] * S[:5]) @ Vh[:5], M, atol=1e-9)
    F = torch.randn(30, 40, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(F, full_matrices=False)
    svd_err = (F - (U[:, :4] * S[:4]) @ Vh[:4]).norm()
    for _ in range(10):  # Eckart-Young: no other rank-4 product is closer
        A = torch.randn(4, 40, generator=g, dtype=torch.float64)
        assert svd_err <= (F - F @ torch.linalg.pinv(A) @ A).norm()


def test_slide_table_and_llama_counts():
    assert abs(slide_table()["1"]["7B"] - 2 * math.sqrt(7e9)) < 1e-6          # 2·r·√N
    llama = linear_shapes_llama()
    assert sum(i * o for i, o in llama.values()) + 2 * 32000 * 4096 + 65 * 4096 == 6_738_415_616
    assert lora_params_real(llama, ["q_proj", "v_proj"], 8) == 32 * 2 * 8 * (4096 + 4096)


def test_float_format_constants():
    f16, b16, f32 = torch.finfo(torch.float16), torch.finfo(torch.bfloat16), torch.finfo(torch.float32)
    assert f16.bits == b16.bits == 16 and torch.tensor([], dtype=torch.bfloat16).element_size() == 2
    assert f16.max == 65504 and abs(b16.max / f32.max - 1) < 0.01
    assert b16.eps == 2 ** -7 and f16.eps == 2 ** -10


def test_qlora_layer_trains_only_A_and_B_at_4_127_bits_and_defaults_to_bf16():
    layer = QLoRALinear.from_linear(nn.Linear(512, 1024), r=8, alpha=16, compute_dtype=torch.float32)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"] and sum(p.numel() for p in layer.parameters() if p.requires_grad) == 8 * 1536
    assert abs(layer.base_layer.quant_state().bits_per_param - 4.127) < 0.001
    bf = QLoRALinear.from_linear(nn.Linear(128, 128), r=4)
    y = bf(torch.randn(2, 128).bfloat16())
    y.float().sum().backward()
    assert bf.lora_A.dtype == y.dtype == bf.lora_A.grad.dtype == torch.bfloat16
    assert dequantize_nf4(bf.base_layer.quant_state(), bf.base_layer.compute_dtype).dtype == torch.bfloat16


def test_int8_codes_are_round_c_x_and_double_quant_dtypes():
    x = torch.tensor([1.5, 2.3, 3.7, 4.1, 5.6, 6.8, 7.9, 8.4, 9.2, 10.2])
    q, absmax = quantize_int8(x)
    assert q.tolist() == torch.round(127 / absmax * x).to(torch.int64).tolist()
    dq = double_quantize_int8(torch.randn(5, 5), blocksize=5)
    assert dq.c1.dtype == torch.int8 and dq.c1.numel() == 5 and dq.c2.dtype == torch.float32 and dq.c2.numel() == 1
    st = quantize_nf4(torch.randn(256, 256))
    assert st.absmax.dtype == torch.uint8 and st.absmax.numel() == 256 * 256 // 64
    assert st.nested_absmax.dtype == torch.float32


def test_every_4bit_format_in_blocks_of_64_stores_4_5_bits():
    rows = error_table({"N(0, 1)": torch.randn(256, 256)}, formats=("nf4", "fp4", "int4"))
    assert all(abs(row["bits_per_param"] - 4.5) < 1e-9 for row in rows)


def test_affine_grid_is_off_by_at_most_half_a_step_and_keeps_zero():
    x = torch.tensor([[-0.4, -0.1, 0.0, 0.3, 0.9, 1.5, 2.2, 3.0]])
    s = quantize_affine(x, bits=4, groupsize=8)
    back = dequantize_affine(s)
    assert (x - back).abs().max() <= s.scale.item() / 2 + 1e-6 and back[0, 2] == 0


def test_segment_bounds_are_ceil_sqrt_n_contiguous_segments():
    for n in range(1, 50):
        b = segment_bounds(n)
        assert len(b) == math.ceil(math.sqrt(n))
        assert b[0][0] == 0 and b[-1][1] == n and all(e == s for (_, e), (s, _) in zip(b, b[1:]))


def test_paged_adamw_state_is_8_bytes_per_parameter_and_moves_whole_pages():
    w = nn.Parameter(torch.randn(1024, 64))
    opt = PagedAdamW([w], lr=1e-2, page_size=4096, device_budget=4 * 4096)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    assert opt.state_nbytes() == 8 * w.numel() == 2 * w.nbytes
    assert opt.stats.bytes_moved == 4096 * (opt.stats.pages_in + opt.stats.pages_out)


def test_the_memory_estimate_s_own_arithmetic():
    c10 = scaled_config(10_000_000_000, n_layer=31, n_embd=5120, n_head=40, block_size=2048)
    assert gpt_param_count(c10) == 10_000_000_000
    full = estimate(c10, "full", dtype="fp16", state_dtype="fp32", seq_len=2048)
    n = full.n_params
    assert (full.weights, full.gradients) == (2 * n, 2 * n) and abs(full.optimizer_state / n - 8) < 1e-6
    assert abs(full.state_bytes / n - 12) < 1e-6 and round(full.state_bytes / GB) == 120
    mixed = estimate(c10, "full", dtype="fp16", state_dtype="fp32", master_weights=True, seq_len=2048)
    assert mixed.master_weights == 4 * n and mixed.total - full.total == 4 * n
    assert f"{8 * nf4_nbytes(10_000_000_000) / 1e10:.3f}" == "4.127"
    q = dict(dtype="bf16", compute_dtype="bf16", state_dtype="fp32", r=64, seq_len=512, checkpointing=True)
    c65 = scaled_config(65_000_000_000, n_layer=80, n_embd=8192, n_head=64, block_size=2048)
    resident = estimate(c65, "qlora", **q)
    paged = estimate(c65, "qlora", **q, optimizer="paged", device_budget=0)
    assert paged.total + paged.offloaded == resident.total


def test_bitsandbytes_paged_optimizer_source():
    """What notebook 4 says bitsandbytes' source does: unified memory, only from 10⁵ elements, prefetch."""
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (dev extra) is read here")
    from bitsandbytes.optim.optimizer import Optimizer8bit
    assert "cget_managed_ptr" in inspect.getsource(F.get_paged)
    buffer_src = inspect.getsource(Optimizer8bit.get_state_buffer)
    assert "get_paged" in buffer_src and "1e5" in buffer_src
    assert "prefetch_tensor" in inspect.getsource(Optimizer8bit.prefetch_state)
