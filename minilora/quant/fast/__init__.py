"""minilora.quant.fast: the CPU speed work behind minilora.quant, the same bytes as its reference files.

    blockwise.py   4-bit quantize / dequantize in cache-sized chunks, scratch buffers, byte-pair table
    blockwise8bit.py  the 8-bit groups of ../blockwise8bit.py (double quantization, optimizer state), in chunks
    nearest.py     nearest code by a uniform bin grid and one compare (instead of a binary search)
    chunks.py      cache-sized chunks; large ranges sliced over a pool of single-threaded threads
    hugepages.py   large outputs on 2 MiB pages, recycled once no tensor uses them

minilora/__init__.py plugs this package into quant/dispatch.py; the public functions hand it their work while
ENABLED is true; with ENABLED = False they run their reference code (tests/test_quant_fast.py compares both).
"""
from .blockwise import dequantize_blockwise_4bit, quantize_blockwise_4bit
from .blockwise8bit import dequantize_groups, quantize_groups

ENABLED = True
