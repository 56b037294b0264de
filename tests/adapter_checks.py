"""Helpers the adapter tests share: a relative error, and adapters moved away from their starting values."""
import torch

from minilora import lora_layers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return ((a - b).norm() / b.norm()).item()


def perturb(model, seed: int = 0, scale: float = 0.1) -> None:
    """Add noise to B and scale DoRA's magnitude, for every adapter of every LoRA layer (mounted or parked), as
    training would: a B left at zero would hide the adapter from any comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            parked = getattr(layer, "parked_adapters", {})
            pairs = [(layer.lora_B, getattr(layer, "lora_magnitude_vector", None))]
            pairs += [(p.B, p.magnitude) for p in parked.values()]
            for b, m in pairs:
                b.add_(scale * torch.randn(b.shape, generator=g))
                if m is not None:
                    m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))
