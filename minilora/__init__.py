"""minilora: LoRA and QLoRA built by hand, small enough to read in one sitting.

Public API (everything a lecture notebook needs is importable from here).
"""
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig
from .lora import LoRALinear
from .inject import (active_adapter, adapter_names, add_lora, find_targets, lora_layers, mark_only_lora_trainable,
                     merge_lora)
from .multi.switch import adapter_batch, delete_adapter, disable_adapters, set_adapter
from .adapters import adapter_state_dict, load_adapter, save_adapter
from .params import ParamCount, count_parameters, format_count, lora_params_real, slide_table
from . import quant
from .quant import dispatch as _dispatch, fast as _fast
_dispatch.plug(_fast)  # the CPU speed path behind minilora.quant (quant/fast/; quant/dispatch.py chooses)
from .quant import QuantState, dequantize_nf2, dequantize_nf4, quantize_nf2, quantize_nf4
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


def model_config(path, caller: str = "from_pretrained"):
    """The GPTConfig or LlamaConfig a model directory's (or Hub id's) config.json describes, by its model_type
    (gpt2; llama, mistral, qwen2); no weights are read."""
    from .gpt import ACTIVATIONS
    from .hf import gpt2, hub
    from .hf import llama as hf_llama
    path, hf = hub.read_config(path, caller)
    kind = hf.get("model_type", "gpt2")
    if kind == "gpt2":
        return GPTConfig(**gpt2.config_from_hf(hf, path / "config.json", ACTIVATIONS))
    if kind not in hf_llama.ARCHITECTURES:
        raise ValueError(f"{caller}: {path / 'config.json'} has model_type {kind!r}; minilora loads gpt2, "
                         f"{', '.join(hf_llama.ARCHITECTURES)}")
    return LlamaConfig(**hf_llama.config_fields(hf, f"{caller}: {path / 'config.json'}"))


def from_pretrained(path, **overrides) -> GPT | Llama:
    """A GPT or a Llama from a transformers directory (or a Hub id in huggingface_hub's cache), whichever its
    config.json's model_type names."""
    from .hf.hub import resolve
    path = resolve(path)
    cls = Llama if isinstance(model_config(path), LlamaConfig) else GPT
    return cls.from_pretrained(path, **overrides)


__version__ = "0.1.0"
