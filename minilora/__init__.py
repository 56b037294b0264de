"""minilora: LoRA and QLoRA built by hand, small enough to read in one sitting.

Public API (everything a lecture notebook needs is importable from here).
"""
from .gpt import GPT, GPTConfig
from .lora import LoRALinear
from .inject import (active_adapter, adapter_names, add_lora, find_targets, lora_layers, mark_only_lora_trainable,
                     merge_lora)
from .multi.switch import adapter_batch, delete_adapter, disable_adapters, set_adapter
from .adapters import adapter_state_dict, load_adapter, save_adapter
from .params import ParamCount, count_parameters, format_count, lora_params_real, slide_table
from . import quant
from .quant import dispatch as _dispatch, fast as _fast
_dispatch.plug(_fast)  # the CPU speed path behind minilora.quant (quant/fast/; quant/dispatch.py chooses)
from .quant import QuantState, dequantize_nf4, quantize_nf4
from .qlora import NF4Linear, QLoRALinear, add_qlora, load_qlora_adapter, merge_qlora, quantize_model
from .variants.dora import DoRALinear, QDoRALinear
from .llm_int8 import Int8Linear
from .checkpointing import checkpoint_sequential, segment_bounds
from .optim import AdamW8bit, PagedAdamW, PagedAdamW8bit, PagerStats
from .memory import (MemoryBreakdown, SavedBytes, SavedTensorMeter, estimate as estimate_memory,
                     measure as measure_memory, measure_saved_activations)
from .data import (BPETokenizer, ByteTokenizer, Example, InstructionSet, TokenStream, english_documents,
                   load_tokenizer, yoda, yoda_dataset)
from .generate import respond
from .evaluate import evaluate
from .train import TrainConfig, TrainResult  # the loop itself: minilora.train.train
from .runs import CheckpointError
from . import demos  # the end-to-end and paging demonstrations: minilora.demos.run_demo, ...

__version__ = "0.1.0"
