"""Demonstrations built from the ingredients (they are not ingredients themselves).

    finetune.py   the end-to-end story: pretrain a small base, then full / LoRA / QLoRA fine-tuning side by side
    paging.py     a paged optimizer surviving one long sequence that a plain AdamW does not
"""
from .finetune import DemoConfig, get_base, pretrain_base, run_demo
from .paging import PagingDemo, SimulatedOutOfMemory, long_sequence_demo
