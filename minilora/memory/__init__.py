"""Memory accounting for fine-tuning: the analytic model and the measured bytes, side by side.

    from minilora.memory import estimate, measure

    est = estimate(config, "qlora", batch_size=8, seq_len=256, r=16, checkpointing=True)
    got = measure(model, optimizer, (idx, targets))      # one real training step
    print(format_table([est, got]))                       # same MemoryBreakdown fields, column by column

estimate() derives every byte from the GPTConfig and the recipe (mode, dtypes, rank, optimizer,
checkpointing): weights, NF4 storage, gradients, AdamW state, adapters, and the tensors autograd saves
per block (minilora.memory.activations). measure() counts the tensors of a model being trained.
The lecture's figures follow from estimate(): a 10B model with fp16 weights and gradients and fp32 Adam
state is 12 bytes per parameter, 120 GB (benchmarks/memory_vs_slides.py prints the rest).

Read in this order:

    breakdown.py    MemoryBreakdown: the bytes of one step by what holds them, and the table that prints it
    activations.py  what autograd saves per block, op by op (the analytic activation model)
    depth.py        those blocks as runs of identical ones: totals and the checkpointed peak at any depth
    inventory.py    the parameters and target layers: one block on the meta device stands for every block
    patterns.py     (machinery) which blocks a target regex selects, tried once per digit count
    estimate.py     the analytic side: every part of a MemoryBreakdown from a GPTConfig and a recipe
    saved.py        the saved-tensor meter: the bytes autograd really keeps, live, on any device
    measure.py      the measured side: one real training step counted into the same MemoryBreakdown
"""
from .activations import ActivationSetup, SavedActivations, saved_activations
from .breakdown import GB, PARTS, MemoryBreakdown, format_bytes, format_table
from .estimate import (DEFAULT_TARGETS, MODES, OPTIMIZERS, activation_bytes_per_token, as_dtype, estimate,
                       gpt_param_count, nf4_nbytes, scaled_config)
from .measure import measure
from .saved import SavedBytes, SavedTensorMeter, measure_saved_activations

__all__ = ["ActivationSetup", "SavedActivations", "saved_activations", "GB", "PARTS", "MemoryBreakdown",
           "format_bytes", "format_table", "DEFAULT_TARGETS", "MODES", "OPTIMIZERS", "activation_bytes_per_token",
           "as_dtype", "estimate", "gpt_param_count", "nf4_nbytes", "scaled_config", "measure", "SavedBytes",
           "SavedTensorMeter", "measure_saved_activations"]
