"""The CPU plumbing under dequantize: the huge-page output cache and the per-thread scratch buffers."""
import threading

import torch

from minilora.quant import dequantize_nf4, quantize_nf4
from minilora.quant.fast import hugepages


MIB32_FLOATS = (32 << 20) // 4


def test_large_outputs_are_recycled_only_when_no_tensor_uses_them():
    hugepages.clear_cache()
    a = hugepages.empty(MIB32_FLOATS, torch.float32)
    assert a.shape == (MIB32_FLOATS,) and a.dtype == torch.float32
    a.fill_(1.5)
    pa = a.data_ptr()
    view = a[5:].view(-1, 1)
    del a
    b = hugepages.empty(MIB32_FLOATS, torch.float32)          # a's memory is still used by the view
    assert b.data_ptr() != pa and float(view[0, 0]) == 1.5
    pb = b.data_ptr()
    del view, b
    c = hugepages.empty(MIB32_FLOATS, torch.float32)          # both free now: the newest is handed out
    assert c.data_ptr() == pb
    d = hugepages.empty(2 * MIB32_FLOATS, torch.bfloat16)     # same byte size, another dtype
    assert d.data_ptr() == pa
    del c, d
    hugepages.clear_cache()
    assert hugepages._maps == []


def test_free_mappings_beyond_the_cache_limit_are_unmapped(monkeypatch):
    hugepages.clear_cache()
    monkeypatch.setattr(hugepages, "CACHE_BYTES", 40 << 20)  # room for one free 32 MiB mapping
    held = [hugepages.empty(MIB32_FLOATS + 1024 * i, torch.float32) for i in range(3)]
    assert len(hugepages._maps) == 3
    del held
    hugepages.empty(MIB32_FLOATS, torch.float32)  # one reused, of the two others only the newest kept
    assert len(hugepages._maps) == 2
    hugepages.clear_cache()


def test_small_outputs_are_plain_tensors():
    n = len(hugepages._maps)
    t = hugepages.empty(1000, torch.bfloat16)
    assert t.shape == (1000,) and t.dtype == torch.bfloat16 and len(hugepages._maps) == n


def test_dequantize_first_in_inference_mode_then_outside_it_in_a_fresh_thread():
    # the per-thread scratch buffers are made on a thread's first dequantize: here inside inference mode
    x = torch.randn(700, 300)
    state = quantize_nf4(x)
    expected = dequantize_nf4(state, torch.bfloat16)
    results, errors = [], []

    def run():
        try:
            with torch.inference_mode():
                results.append(dequantize_nf4(state, torch.bfloat16))
            results.append(dequantize_nf4(state, torch.bfloat16))
        except Exception as e:  # noqa: BLE001 - reported to the test thread below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors, errors
    assert results[0].is_inference() and not results[1].is_inference()
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected)
