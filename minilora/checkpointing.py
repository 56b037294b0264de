"""Gradient checkpointing from scratch: keep only segment inputs, recompute each segment in backward.

A plain forward through n blocks keeps every block's saved activations until backward: memory O(n).
Splitting the blocks into s segments and keeping only each segment's input costs s inputs plus, during
backward, the activations of the one segment being recomputed: memory O(s + n/s), smallest at s = √n,
which gives O(√n) for one extra forward pass (Chen et al. 2016, "Training deep nets with sublinear memory
cost"). minilora's default is s = ⌈√n⌉ segments of ⌈n/s⌉ or ⌊n/s⌋ blocks.

The segment is an autograd.Function whose forward runs the blocks under no_grad and saves only x. Its
backward replays the blocks with grad enabled from the saved x and asks torch.autograd.grad for the
gradients of x and of the segment's trainable parameters. The parameters are passed to the Function as
inputs, which matters for LoRA and QLoRA: the segment input there often does not require grad (frozen
embeddings), and a Function whose tensor inputs all lack requires_grad would produce an output that
autograd considers constant — no gradient would ever reach the adapters inside the segment. With the
trainable parameters among the inputs, the output requires grad whenever anything inside can learn.

Dropout in the replay must draw the same masks as the forward did: the CPU (and the input's CUDA device)
random-number state is saved before the forward and restored around the replay, then put back, so the
global random stream continues exactly as without checkpointing. Autocast state is replayed as well.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn


def segment_bounds(n: int, segments: int | None = None) -> list[tuple[int, int]]:
    """Split n blocks into `segments` consecutive runs [start, end) whose lengths differ by at most one.

    segments=None means s = ⌈√n⌉, the minimiser of s + n/s (inputs kept + one segment recomputed).
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n (number of blocks) must be a non-negative int, got {n!r}")
    if n == 0:
        return []
    s = math.isqrt(n - 1) + 1 if segments is None else segments  # ⌈√n⌉
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= n:
        raise ValueError(f"segments must be None (⌈√n⌉) or an int in [1, {n}] for {n} blocks, got {segments!r}")
    size, extra = divmod(n, s)
    bounds, start = [], 0
    for i in range(s):
        end = start + size + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # older torch, or a device type without autocast
        return False, None


class CheckpointSegment(torch.autograd.Function):
    """y = blocks(x), keeping only x (and the RNG state) for backward; backward recomputes blocks(x)."""

    @staticmethod
    def forward(ctx, blocks: nn.Module, preserve_rng: bool, x: torch.Tensor, *params: torch.Tensor):
        ctx.blocks, ctx.preserve_rng, ctx.params = blocks, preserve_rng, params
        ctx.autocast = _autocast_state(x.device.type)
        if preserve_rng:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)  # the only activation this segment keeps
        with torch.no_grad():
            return blocks(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = ctx.params
        want_x = ctx.needs_input_grad[2]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        x = x.detach().requires_grad_(want_x)
        if ctx.preserve_rng:  # replay the forward's random numbers, then continue the stream as it was
            cpu_now = torch.get_rng_state()
            cuda_now = torch.cuda.get_rng_state(x.device) if ctx.cuda_rng is not None else None
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
        try:
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                y = ctx.blocks(x)
        finally:
            if ctx.preserve_rng:
                torch.set_rng_state(cpu_now)
                if cuda_now is not None:
                    torch.cuda.set_rng_state(cuda_now, x.device)
        inputs = ([x] if want_x else []) + wanted
        grads = list(torch.autograd.grad(y, inputs, grad_out, allow_unused=True)) if inputs else []
        gx = grads.pop(0) if want_x else None
        it = iter(grads)
        gparams = [next(it) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, gx, *gparams)


def checkpoint(blocks: nn.Module, x: torch.Tensor, preserve_rng_state: bool = True) -> torch.Tensor:
    """blocks(x) with only x kept for backward; blocks is recomputed from x when the gradient arrives."""
    params = [p for p in blocks.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        return blocks(x)  # nothing to differentiate: no graph, nothing to save
    return CheckpointSegment.apply(blocks, preserve_rng_state, x, *params)


class Segment(nn.Sequential):
    """Machinery: modules run in order, each called as m(x, *args), with args the same constant inputs for every
    module (a Llama layer's rotary cos and sin); they are not differentiated, and a replay reuses them."""

    def __init__(self, modules: Sequence[nn.Module], args: tuple = ()):
        super().__init__(*modules)
        self.args = args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self:
            x = m(x, *self.args)
        return x


def checkpoint_sequential(modules: Sequence[nn.Module] | nn.Sequential | nn.ModuleList, x: torch.Tensor, *args,
                          segments: int | None = None, preserve_rng_state: bool = True) -> torch.Tensor:
    """Run x through modules in order (each as m(x, *args)), checkpointed in `segments` segments (None: ⌈√n⌉
    for n modules).

    Only the input of each segment is kept for backward; every segment is recomputed once in backward, so the
    saved activations peak at about s segment inputs + one segment's activations instead of all n modules'.
    Without grad mode (evaluation, torch.no_grad) the modules simply run.
    """
    if isinstance(modules, nn.Module) and not isinstance(modules, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"modules must be a sequence of modules (list, nn.Sequential, nn.ModuleList), "
                        f"got {type(modules).__name__}")
    modules = list(modules)
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules[{i}] must be an nn.Module, got {type(m).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    bounds = segment_bounds(len(modules), segments)
    if not torch.is_grad_enabled():
        return Segment(modules, args)(x)
    for start, end in bounds:
        x = checkpoint(Segment(modules[start:end], args), x, preserve_rng_state)
    return x
