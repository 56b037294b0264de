"""One frozen base, many named adapters: one mounted per layer and the rest parked (named.py), switched model-wide
(switch.py), or each example of a batch through its own (mixed_batch.py)."""
