"""The CPU speed machinery behind minilora.quant (filled in by the quantization redesign)."""
