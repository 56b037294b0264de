"""LoRA's variants: DoRA's magnitude and direction (dora.py); PiSSA and LoftQ, which start A and B from the
weight itself (lora_init.py)."""
