"""The CPU speed path (minilora.quant.fast) gives the reference's bytes: every dtype, blocksize, ragged size.

The public functions run the fast path while minilora.quant.fast.ENABLED is true and their reference code
when it is false; both runs are compared bit for bit (floats as their int32 / int16 bit patterns, so that
-0.0 and 0.0 differ). Small chunks and a forced three-thread pool make small tensors cross chunk and slice
boundaries as large ones do.
"""
import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.quant import (dequantize_4bit, dequantize_nf4, fp4_code, int4_code, nf4_code,
                            quantize_4bit)
from minilora.quant import fast
from minilora.quant.codebooks import midpoints, dynamic_code
from minilora.quant.blockwise8bit import dequantize_groups as dequantize_blockwise_8bit, quantize_groups as quantize_blockwise_8bit
from minilora.quant.fast import blockwise as fast_blockwise, chunks, blockwise8bit as fast_double

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
CODES = {"nf4": nf4_code(), "fp4": fp4_code(), "int4": int4_code()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (floats as same-width ints), for an exact comparison."""
    if t.is_floating_point():
        return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


@contextlib.contextmanager
def patched(module, **values):
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


@contextlib.contextmanager
def small_chunks():
    """Chunks of 8192 elements (a multiple of every blocksize) and three slices on the pool for any size."""
    with patched(fast_blockwise, CHUNK=8192, DEQUANT_CHUNK=8192), patched(fast_double, CHUNK=8192), \
            patched(chunks, workers=lambda: 3, MIN_SLICE=1):
        yield


def run(f, *args, use_fast: bool, small: bool = False):
    with patched(fast, ENABLED=use_fast), (small_chunks() if small else contextlib.nullcontext()):
        return f(*args)


@st.composite
def weights(draw):
    """(x, blocksize): ragged sizes, zeros, outliers, exact midpoint ties, or hypothesis' own floats."""
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    n = draw(st.integers(0, 6)) * blocksize + draw(st.integers(0, blocksize - 1))
    n = draw(st.sampled_from([n, n + 3 * 8192]))  # a few chunks of the small-chunk setting
    kind = draw(st.sampled_from(["normal", "ties", "floats"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if kind == "floats":
        vals = st.floats(-6e4, 6e4, allow_nan=False, width=32)
        x = torch.tensor(draw(st.lists(vals, min_size=min(n, 64), max_size=min(n, 64))) or [0.0])
        x = x.repeat(n // max(x.numel(), 1) + 1)[:n] * torch.randn(n, generator=g).sign()
    elif kind == "ties":  # s = x / 1 lands exactly on a midpoint between two codes
        mids = midpoints(CODES[draw(st.sampled_from(list(CODES)))])
        x = mids[torch.randint(0, 15, (n,), generator=g)]
        x[::blocksize] = 1.0
    else:
        x = torch.randn(n, generator=g) * 10.0 ** draw(st.integers(-30, 30))
        x[torch.rand(n, generator=g) < 0.05] *= 100.0
        x[torch.rand(n, generator=g) < 0.1] = 0.0
    return x.to(draw(st.sampled_from(DTYPES))), blocksize


@settings(max_examples=120, deadline=None)
@given(xb=weights(), name=st.sampled_from(list(CODES)), double_quant=st.booleans(), small=st.booleans())
def test_fast_path_is_byte_equal_to_the_reference(xb, name, double_quant, small):
    x, blocksize = xb
    if not torch.isfinite(x).all():  # float16 overflow of a scaled value: not a quantizable input
        return
    ref = run(quantize_4bit, x, CODES[name], blocksize, double_quant, use_fast=False)
    got = run(quantize_4bit, x, CODES[name], blocksize, double_quant, use_fast=True, small=small)
    for field in ("packed", "absmax", "offset", "nested_absmax", "nested_code"):
        a, b = getattr(ref, field), getattr(got, field)
        assert (a is None and b is None) or torch.equal(bits(a), bits(b)), field
    for dtype in DTYPES:
        w_ref = run(dequantize_4bit, ref, dtype, use_fast=False)
        w = run(dequantize_4bit, ref, dtype, use_fast=True, small=small)
        assert w.dtype == dtype and w.shape == x.shape and torch.equal(bits(w), bits(w_ref)), dtype


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3 * 8192 + 300), blocksize=st.sampled_from(BLOCKSIZES), seed=st.integers(0, 2**31),
       scale=st.integers(-30, 30), small=st.booleans())
def test_fast_8bit_rows_are_byte_equal_to_the_reference(n, blocksize, seed, scale, small):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=g) * 10.0 ** scale
    y[torch.rand(n, generator=g) < 0.2] = 0.0
    code = dynamic_code()
    q_ref, c_ref = run(quantize_blockwise_8bit, y, code, blocksize, use_fast=False)
    q, c = run(quantize_blockwise_8bit, y, code, blocksize, use_fast=True, small=small)
    assert torch.equal(q, q_ref) and torch.equal(bits(c), bits(c_ref))
    offset = torch.tensor(float(y.mean()) if n else 0.0)
    back_ref = run(dequantize_blockwise_8bit, q, c, code, blocksize, offset, use_fast=False)
    back = run(dequantize_blockwise_8bit, q, c, code, blocksize, offset, use_fast=True, small=small)
    assert torch.equal(bits(back), bits(back_ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_output_from_the_huge_page_cache_equals_the_reference(dtype):
    # 8.4 M elements: a float32 output of 32 MiB and more comes from fast/hugepages.py; default chunking
    torch.manual_seed(0)
    x = torch.randn(2049, 4096 + 7) * 0.02
    state = run(quantize_4bit, x, nf4_code(), 64, True, use_fast=True)
    assert state == run(quantize_4bit, x, nf4_code(), 64, True, use_fast=False)
    w = run(dequantize_nf4, state, dtype, use_fast=True)
    assert torch.equal(bits(w), bits(run(dequantize_nf4, state, dtype, use_fast=False)))


def test_reference_files_import_no_speed_machinery():
    import ast
    import pathlib
    import minilora.quant as q
    root = pathlib.Path(q.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; a function may import the fast path on first use
            if isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
                assert not (node.module or "").startswith("fast") and "fast" not in names, (path.name, node.module)
