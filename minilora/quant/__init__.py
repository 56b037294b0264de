"""minilora.quant: storage formats for quantized weights (plain tensors, no nn.Module).

    int8 absmax          quantize_int8 / dequantize_int8                  X_int8 = round(127/absmax · X)
    codebooks            nf4_code, nf2_code, fp4_code, int4_code, dynamic_code   the tables, derived in code
    blockwise 4-bit      quantize_blockwise_4bit / dequantize_blockwise_4bit (any codebook)
    8-bit blockwise      quantize_blockwise_8bit / dequantize_blockwise_8bit  (signed / unsigned dynamic maps)
    double quantization  quantize_absmax / dequantize_absmax_8bit; int8 teaching mode double_quantize_int8
    QuantState           quantize_nf4 / dequantize_nf4 (nf4.py), nbytes, bits_per_param, dequantize_absmax
    NF2 (2 bits)         quantize_nf2 / dequantize_nf2 (nf2.py); quantize_nf / dequantize_nf pick by bits
    affine RTN           quantize_affine / dequantize_affine              q = round(x / S + Z), groups of the last dim
    GPTQ                 gptq_quantize / quantize_model_gptq              column by column with error feedback (OBS)
    interchange          to_bnb_state_dict / from_bnb_state_dict          bitsandbytes / HF checkpoint layout
    error bounds         error_bound_4bit / error_bound_int8               what the property tests check
    error table          roundtrip_errors / error_table                   NF4 vs FP4 vs int4 vs int8, measured

The format facts they share (float dtypes, the blocksize rule, NESTED_BLOCKSIZE, TINY, nf4_nbytes) are in
format.py. Each file states its format as the lecture does; the CPU speed work (chunks, a thread pool, scratch
buffers, lookup tables, huge-page outputs) is the subpackage quant/fast/, which no file here imports: the package
root (minilora/__init__.py) plugs it into dispatch.py, and the public functions hand it their work through
dispatch.fast_path(); it produces the same bytes (tests/test_quant_fast.py).
"""
from .codebooks import dynamic_code, fp4_code, get_code, int4_code, max_gap, nf2_code, nf4_code
from .int8 import dequantize_int8, quantize_int8
from .blockwise import dequantize_blockwise_4bit, quantize_blockwise_4bit
from .double import (Int8DoubleQuant, dequantize_absmax_8bit, double_dequantize_int8, double_quantize_int8,
                     quantize_absmax)
from .quant_state import QuantState
from .nf4 import dequantize_4bit, dequantize_absmax, dequantize_nf4, quantize_4bit, quantize_nf4
from .nf2 import dequantize_nf, dequantize_nf2, quantize_nf, quantize_nf2
from .bnb_format import from_bnb_state_dict, to_bnb_state_dict
from .bounds import error_bound_4bit, error_bound_int8
from .error_tables import FORMATS, error_table, roundtrip_errors
from .blockwise8bit import Blockwise8bitState, dequantize_blockwise_8bit, quantize_blockwise_8bit
from .affine import AffineState, dequantize_affine, quantize_affine
from .gptq import GPTQState, dequantize_gptq, gptq_quantize, quantize_model_gptq

__all__ = [
    "nf4_code", "nf2_code", "fp4_code", "int4_code", "dynamic_code", "get_code", "max_gap",
    "quantize_int8", "dequantize_int8",
    "quantize_blockwise_4bit", "dequantize_blockwise_4bit",
    "quantize_absmax", "dequantize_absmax_8bit", "Int8DoubleQuant", "double_quantize_int8", "double_dequantize_int8",
    "QuantState", "quantize_4bit", "dequantize_4bit", "quantize_nf4", "dequantize_nf4", "dequantize_absmax",
    "quantize_nf2", "dequantize_nf2", "quantize_nf", "dequantize_nf",
    "to_bnb_state_dict", "from_bnb_state_dict", "error_bound_4bit", "error_bound_int8",
    "roundtrip_errors", "error_table",
    "Blockwise8bitState", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "AffineState", "quantize_affine", "dequantize_affine", "GPTQState", "gptq_quantize", "dequantize_gptq",
    "quantize_model_gptq",
]
