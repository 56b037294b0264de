"""The paged optimizer's reason to exist, run end to end: one long sequence, one memory spike.

A small GPT (gradient checkpointing on) trains on short batches, then meets one long-sequence batch. The
activations autograd keeps for that batch spike. Device memory is modelled as

    used(t) = weights + gradients  +  saved activations alive at t  +  optimizer pages on the device at t

against a fixed capacity `device_bytes`. The saved activations are measured live by minilora's saved-tensor
meter; the optimizer's resident bytes come from the optimizer itself. Three runs on the same batches:

1. torch.optim.AdamW on the modelled device: its full state stays resident, so the long batch's spike
   does not fit and the run stops with SimulatedOutOfMemory at that step;
2. PagedAdamW on the modelled device: whenever the activations grow, its budget shrinks to what is free and
   least recently used pages are evicted to host memory; after backward the budget grows back and pages
   return as the update needs them. The run completes and the counters show what moved;
3. torch.optim.AdamW with no device model, to show that paging changed no number.

What this models honestly, and what not: on a CPU-only machine there is no device memory to run out of, so
"out of memory" is the modelled capacity being exceeded, the page copies are real copies between CPU
buffers, and memory that is neither saved for backward nor optimizer state (temporaries, allocator
slack) is not in the model. On CUDA the same code moves pages between device and pinned host memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..memory import SavedTensorMeter, measure_saved_activations
from ..gpt import GPT, GPTConfig
from ..optim import PagedAdamW


class SimulatedOutOfMemory(RuntimeError):
    """The modelled device's capacity was exceeded."""


@dataclass
class DemoStep:
    """One training step of the paged run: activation peak (saved bytes), optimizer bytes resident at that
    peak, page copies during the step, and whether plain AdamW's full state would have fitted beside it."""
    step: int
    seq_len: int
    activation_peak: int
    resident_at_peak: int
    pages_out: int
    pages_in: int
    fits_unpaged: bool


@dataclass
class PagingDemo:
    device_bytes: int
    fixed_bytes: int          # weights + gradients
    state_bytes: int          # full optimizer state (page-rounded)
    page_size: int
    steps: list[DemoStep] = field(default_factory=list)
    unpaged_oom_step: int | None = None   # step at which plain AdamW ran out of the modelled device
    max_used_bytes: int = 0               # paged run: most bytes in use at any moment (≤ device_bytes)
    max_param_rel_diff: float = 0.0       # paged run vs unconstrained AdamW, max over parameters of ‖Δ‖/‖p‖
    losses: list[float] = field(default_factory=list)
    total_pages_in: int = 0
    total_pages_out: int = 0
    total_bytes_moved: int = 0


def _batches(seq_lens: list[int], batch_size: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, t), generator=g) for t in seq_lens]


def long_sequence_demo(device_bytes: int | None = None, short_len: int = 16, long_len: int = 128,
                       n_short: int = 4, long_at: int = 2, batch_size: int = 4, page_size: int = 4096,
                       lr: float = 1e-2, seed: int = 0, config: GPTConfig | None = None,
                       device: str | torch.device = "cpu") -> PagingDemo:
    """Train on n_short + 1 batches (the long one at index long_at) three ways; see the module docstring.

    device_bytes=None picks the capacity the lecture needs: fixed + max(A_short + S, A_long + S/2), where S is
    the full optimizer state and A the measured activation peaks — every short step fits with the whole state
    resident, the long step fits only if about half the state leaves the device. On device="cuda" the pages
    really move between GPU and pinned host memory (the capacity is still the modelled one).
    """
    if not 0 <= long_at <= n_short:
        raise ValueError(f"long_at must be in [0, n_short={n_short}], got {long_at}")
    config = config or GPTConfig(block_size=max(long_len, short_len), vocab_size=64, n_layer=4, n_head=2,
                                 n_embd=32, gradient_checkpointing=True)
    seq_lens = [short_len] * n_short
    seq_lens.insert(long_at, long_len)
    batches = [b.to(device) for b in _batches(seq_lens, batch_size, config.vocab_size, seed + 1)]

    def fresh() -> GPT:
        torch.manual_seed(seed)
        return GPT(config).to(device).train()

    probe = fresh()
    fixed = 2 * sum(p.numel() * p.element_size() for p in probe.parameters())  # weights + grads
    state = PagedAdamW(probe.parameters(), page_size=page_size).state_nbytes()
    if device_bytes is None:
        def peak(idx):
            return measure_saved_activations(lambda: probe(idx, idx)[1].backward(), exclude=probe).peak
        a_short, a_long = peak(batches[long_at - 1 if long_at else -1]), peak(batches[long_at])
        device_bytes = fixed + max(a_short + state, a_long + state // 2)
    if device_bytes <= fixed:
        raise ValueError(f"device_bytes={device_bytes} leaves no room beyond weights and gradients ({fixed} bytes)")
    demo = PagingDemo(device_bytes=device_bytes, fixed_bytes=fixed, state_bytes=state, page_size=page_size)
    free_idle = device_bytes - fixed  # what optimizer pages may use when no activation is alive

    # 1. plain AdamW on the modelled device: full state resident once it exists
    model = fresh()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)

    def adamw_resident() -> int:
        return sum(t.numel() * t.element_size() for st in opt.state.values()
                   for k, t in st.items() if k != "step")

    def check_unpaged(current: int) -> None:
        if fixed + adamw_resident() + current > device_bytes:
            raise SimulatedOutOfMemory(f"{fixed} + {adamw_resident()} + {current} > {device_bytes}")

    for i, idx in enumerate(batches):
        try:
            with SavedTensorMeter(exclude=model, on_change=check_unpaged):
                opt.zero_grad()
                model(idx, idx)[1].backward()
        except SimulatedOutOfMemory:
            demo.unpaged_oom_step = i
            break
        opt.step()

    # 2. PagedAdamW on the modelled device: the budget is whatever the activations leave free
    model = fresh()
    opt = PagedAdamW(model.parameters(), lr=lr, page_size=page_size, device_budget=free_idle // page_size * page_size)
    pager = opt.pager

    spike = {"peak": -1, "resident": 0}

    def squeeze(current: int) -> None:
        free = device_bytes - fixed - current
        if free < 0:
            raise SimulatedOutOfMemory(f"activations alone ({current} bytes) exceed the device")
        pager.set_budget(min(free, free_idle) // page_size * page_size)  # evicts LRU pages over it
        demo.max_used_bytes = max(demo.max_used_bytes, fixed + current + pager.resident_bytes)
        if current > spike["peak"]:
            spike.update(peak=current, resident=pager.resident_bytes)

    for i, idx in enumerate(batches):
        before_in, before_out = pager.stats.pages_in, pager.stats.pages_out
        spike.update(peak=-1, resident=pager.resident_bytes)
        meter = SavedTensorMeter(exclude=model, on_change=squeeze)
        with meter:
            opt.zero_grad()
            _, loss = model(idx, idx)
            loss.backward()
        pager.set_budget(free_idle // page_size * page_size)  # activations gone: the pages may come back
        pager.reset_peak()
        opt.step()
        demo.max_used_bytes = max(demo.max_used_bytes, fixed + pager.stats.peak_resident_bytes)
        demo.losses.append(loss.item())
        demo.steps.append(DemoStep(step=i, seq_len=idx.size(1), activation_peak=meter.peak,
                                   resident_at_peak=spike["resident"],
                                   pages_out=pager.stats.pages_out - before_out,
                                   pages_in=pager.stats.pages_in - before_in,
                                   fits_unpaged=fixed + state + meter.peak <= device_bytes))
    demo.total_pages_in, demo.total_pages_out = pager.stats.pages_in, pager.stats.pages_out
    demo.total_bytes_moved = pager.stats.bytes_moved

    # 3. unconstrained AdamW: the numbers paging must not change
    ref = fresh()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr, foreach=False)
    for idx in batches:
        ref_opt.zero_grad()
        ref(idx, idx)[1].backward()
        ref_opt.step()
    demo.max_param_rel_diff = max(((p - q).norm() / q.norm().clamp_min(1e-30)).item()
                                  for p, q in zip(model.parameters(), ref.parameters()))
    return demo
