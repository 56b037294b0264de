"""Slices of a long range on a pool of single-threaded CPU threads (quantize and dequantize use them)."""
import threading

import pytest
import torch

from minilora.quant import dequantize_nf4, quantize_nf4
from minilora.quant.fast import chunks


@pytest.fixture
def three_workers(monkeypatch):
    """Force the pool path (three slices) whatever the CPU count of the machine running the tests."""
    monkeypatch.setattr(chunks, "workers", lambda: 3)
    monkeypatch.setattr(chunks, "MIN_SLICE", 1)


def test_slices_cover_the_range_once_at_chunk_multiples(three_workers):
    n, chunk = 10 * 64 + 17, 64
    seen = torch.zeros(n, dtype=torch.int32)
    calls = []

    def work(begin, end):
        calls.append((begin, end, threading.current_thread().name))
        seen[begin:end] += 1

    chunks.run_chunked(n, work, torch.device("cpu"), chunk)
    assert torch.equal(seen, torch.ones(n, dtype=torch.int32))
    assert len(calls) == 3 and all(b % chunk == 0 for b, _, _ in calls)
    assert all(name.startswith("minilora-quant") for _, _, name in calls)


def test_small_ranges_run_inline(three_workers):
    names = []
    chunks.run_chunked(64, lambda b, e: names.append((b, e, threading.current_thread().name)), "cpu", 64)
    assert names == [(0, 64, threading.current_thread().name)]


def test_pool_threads_are_single_threaded_and_leave_other_threads_alone(three_workers):
    before = torch.get_num_threads()
    counts = []
    chunks.run_chunked(3 * 64, lambda b, e: counts.append(torch.get_num_threads()), torch.device("cpu"), 64)
    assert counts == [1, 1, 1]
    assert torch.get_num_threads() == before
    in_new_thread = []
    t = threading.Thread(target=lambda: in_new_thread.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert in_new_thread == [before]


def test_errors_and_modes_reach_the_caller(three_workers):
    def fail_in_last(begin, end):
        if end == 3 * 64:
            raise ValueError("slice failed")

    with pytest.raises(ValueError, match="slice failed"):
        chunks.run_chunked(3 * 64, fail_in_last, torch.device("cpu"), 64)
    modes = []
    with torch.inference_mode():
        chunks.run_chunked(3 * 64, lambda b, e: modes.append(torch.is_inference_mode_enabled()), "cpu", 64)
    with torch.no_grad():
        chunks.run_chunked(3 * 64, lambda b, e: modes.append(torch.is_grad_enabled()), "cpu", 64)
    assert modes == [True] * 3 + [False] * 3


def test_pooled_quantize_and_dequantize_match_the_inline_path(monkeypatch):
    x = torch.randn(1_000_003)
    monkeypatch.setattr(chunks, "workers", lambda: 1)
    state1 = quantize_nf4(x)
    w1 = dequantize_nf4(state1)
    monkeypatch.setattr(chunks, "workers", lambda: 3)
    monkeypatch.setattr(chunks, "MIN_SLICE", 1)
    state3 = quantize_nf4(x)
    assert torch.equal(state3.packed, state1.packed) and torch.equal(state3.absmax, state1.absmax)
    assert torch.equal(dequantize_nf4(state3), w1)


def test_ranges_under_two_min_slices_run_inline(monkeypatch):
    monkeypatch.setattr(chunks, "workers", lambda: 3)
    names = []
    chunks.run_chunked(2 * chunks.MIN_SLICE - 1, lambda b, e: names.append(threading.current_thread().name),
                       "cpu", 1024)
    assert names == [threading.current_thread().name]


def _sum_in_slices(n):
    out = torch.zeros(n)
    chunks.run_chunked(n, lambda b, e: out[b:e].fill_(1.0), "cpu", 64)
    return float(out.sum())


def test_a_forked_child_makes_its_own_pool(three_workers):
    import multiprocessing

    assert _sum_in_slices(3 * 64) == 3 * 64   # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as child:
        assert child.apply_async(_sum_in_slices, (5 * 64,)).get(timeout=60) == 5 * 64
