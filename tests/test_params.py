import pytest

from minilora import GPT, GPTConfig, add_lora, count_parameters, format_count, lora_params_real, slide_table
from minilora.params import linear_shapes_gpt2, linear_shapes_llama

# The lecture's "Number of trainable parameters" table, cell by cell, as printed on the slide.
SLIDE = {
    "1": ["167K", "228K", "529K", "849K"], "2": ["334K", "456K", "1M", "2M"],
    "8": ["1M", "2M", "4M", "7M"], "16": ["3M", "4M", "8M", "14M"],
    "512": ["86M", "117M", "270M", "434M"], "1024": ["171M", "233M", "542M", "869M"],
    "8192": ["1.4B", "1.8B", "4.3B", "7B"], "Full": ["7B", "13B", "70B", "180B"],
}
# Cells where the slide cut the last digit instead of rounding it; 2·r·√N gives these.
SLIDE_TRUNCATED = {("2", "7B"): "335K", ("512", "70B"): "271M", ("1024", "13B"): "234M", ("8192", "13B"): "1.9B"}


def parse(cell: str) -> float:
    return float(cell[:-1]) * {"K": 1e3, "M": 1e6, "B": 1e9}[cell[-1]]


def unit(cell: str) -> float:
    """One unit in the last printed digit of a cell."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}[cell[-1]]
    return scale * (0.1 if "." in cell else 1)


def test_slide_table_cell_by_cell():
    ours = slide_table()
    for rank, row in SLIDE.items():
        for model, printed in zip(["7B", "13B", "70B", "180B"], row):
            value = ours[rank][model]
            if (rank, model) in SLIDE_TRUNCATED:
                assert format_count(value) == SLIDE_TRUNCATED[rank, model]
                assert parse(printed) <= value < parse(printed) + unit(printed)  # truncated, not rounded
            else:
                assert format_count(value) == printed, (rank, model)
    assert ours["1"]["7B"] == pytest.approx(167332, abs=1)


def test_count_parameters_format_and_tied_weights():
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=8))
    count = count_parameters(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count.total == sum(unique.values()) and count.trainable == count.total
    add_lora(model, ["c_attn"], r=2)
    count = count_parameters(model)
    assert count.trainable == 2 * (8 + 24)
    assert str(count) == f"trainable params: 64 || all params: {count.total:,} || trainable%: {100 * 64 / count.total:.4f}"


def test_real_counts_for_gpt2_and_llama_shapes():
    config = GPTConfig(block_size=64, vocab_size=100, n_layer=3, n_head=4, n_embd=64)
    model = add_lora(GPT(config), ["c_attn", "c_proj"], r=8)
    analytic = lora_params_real(linear_shapes_gpt2(3, 64), ["c_attn", "c_proj"], r=8)
    assert count_parameters(model).trainable == analytic
    # LLaMA-2 7B, q and v at rank 8: 32 layers · 2 · 8 · (4096 + 4096) = 4,194,304 (PEFT reports the same).
    assert lora_params_real(linear_shapes_llama(), ["q_proj", "v_proj"], r=8) == 4_194_304
    with pytest.raises(ValueError, match="match none"):
        lora_params_real(linear_shapes_gpt2(), ["q_proj"], r=8)
