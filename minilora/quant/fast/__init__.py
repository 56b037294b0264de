"""minilora.quant.fast: the CPU speed work behind minilora.quant, the same bytes as its reference files.

    blockwise.py   4-bit quantize / dequantize in cache-sized chunks, scratch buffers, byte-pair table
    double.py      the 8-bit (double quantization) rows of ../double.py, walked in chunks
    nearest.py     nearest code by a uniform bin grid and one compare (instead of a binary search)
    chunks.py      cache-sized chunks; large ranges sliced over a pool of single-threaded threads
    hugepages.py   large outputs on 2 MiB pages, recycled once no tensor uses them

The public functions of minilora.quant import this package on first use and hand it their work while
ENABLED is true; with ENABLED = False they run their reference code (tests/test_quant_fast.py compares both).
"""
from .blockwise import dequantize_blockwise_4bit, quantize_blockwise_4bit
from .double import dequantize_blockwise_8bit, quantize_blockwise_8bit

ENABLED = True
