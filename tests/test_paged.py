import io

import pytest
import torch

from minilora import GPT, GPTConfig, PagedAdamW
from minilora.demos import long_sequence_demo

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
PAGE = 4096  # 512 elements' m and v per page


def new_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32))


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (4, 16), generator=g) for _ in range(n)]


def train(model, opt, data, sched=None, after_step=None):
    for idx in data:
        opt.zero_grad()
        model(idx, idx)[1].backward()
        opt.step()
        if sched is not None:
            sched.step()
        if after_step is not None:
            after_step(opt)
    return model


def max_rel(a: GPT, b: GPT) -> float:
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(scope="module")
def reference():
    model = new_model()
    return train(model, torch.optim.AdamW(model.parameters(), **HP), batches(50))


def quarter_budget(model) -> int:
    full = PagedAdamW(model.parameters(), page_size=PAGE).state_nbytes()
    return full // 4 // PAGE * PAGE


def test_quarter_budget_matches_adamw_and_counts_every_byte(reference):
    model = new_model()
    budget = quarter_budget(model)
    opt = PagedAdamW(model.parameters(), **HP, page_size=PAGE, device_budget=budget)
    peaks = []
    train(model, opt, batches(50), after_step=lambda o: peaks.append(o.stats.peak_resident_bytes))
    assert max_rel(model, reference) <= 1e-6
    s, N, C = opt.stats, opt.state_nbytes() // PAGE, budget // PAGE
    assert max(peaks) == s.peak_resident_bytes <= budget and opt.pager.resident_bytes <= budget
    assert s.bytes_in == s.pages_in * PAGE and s.bytes_out == s.pages_out * PAGE
    assert s.bytes_moved == (s.pages_in + s.pages_out) * PAGE
    # conservation: pages created on the device + copied in − copied out = pages on the device now
    assert s.pages_born == N and s.pages_born + s.pages_in - s.pages_out == len(opt.pager.on_device)
    # LRU under a cyclic scan of N > C pages misses every page on every step after the first
    assert s.pages_in == 49 * N and s.pages_out == 50 * N - C
    assert len(opt.pager.on_host) == N and all(t.shape == (2, PAGE // 8) for t in opt.pager.on_host.values())


@pytest.mark.parametrize("budget", [0, None])
def test_everything_paged_and_nothing_paged(reference, budget):
    model = new_model()
    opt = PagedAdamW(model.parameters(), **HP, page_size=PAGE, device_budget=budget)
    train(model, opt, batches(50))
    assert max_rel(model, reference) <= 1e-6
    s, N = opt.stats, opt.state_nbytes() // PAGE
    if budget is None:
        assert s.pages_in == s.pages_out == 0 and s.peak_resident_bytes == N * PAGE == opt.pager.resident_bytes
    else:  # one page in flight during its own update (a page two parameters share stays for the second), none kept
        assert opt.pager.resident_bytes == 0 and s.peak_resident_bytes == PAGE
        assert s.pages_out == 50 * N and s.pages_in == 49 * N
        assert s.bytes_moved == (s.pages_in + s.pages_out) * PAGE


def test_state_dict_mid_run_resumes_identically(reference):
    data = batches(50)
    model = new_model()
    opt = PagedAdamW(model.parameters(), **HP, page_size=PAGE, device_budget=quarter_budget(model))
    train(model, opt, data[:20])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["state"][0]["exp_avg"].shape == model.transformer.wte.weight.shape
    for budget in (0, quarter_budget(model)):  # resume under another budget and page size too
        resumed = new_model()
        resumed.load_state_dict(ckpt["model"])
        opt2 = PagedAdamW(resumed.parameters(), **HP, page_size=2 * PAGE, device_budget=budget)
        opt2.load_state_dict(ckpt["opt"])
        train(resumed, opt2, data[20:])
        assert max_rel(resumed, reference) <= 1e-6
    # the layout is torch.optim.AdamW's: the state continues there too
    resumed = new_model()
    resumed.load_state_dict(ckpt["model"])
    plain = torch.optim.AdamW(resumed.parameters(), **HP)
    plain.load_state_dict(ckpt["opt"])
    train(resumed, plain, data[20:])
    assert max_rel(resumed, reference) <= 1e-6


def test_lr_scheduler_and_param_groups():
    results = []
    for paged in (False, True):
        model = new_model()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        groups = [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0, lr=3e-3)]
        opt = (PagedAdamW(groups, lr=1e-2, page_size=PAGE, device_budget=quarter_budget(model)) if paged
               else torch.optim.AdamW(groups, lr=1e-2))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-2, 5e-3], total_steps=30)
        results.append(train(model, opt, batches(30), sched=sched))
        lrs = [g["lr"] for g in opt.param_groups]
    assert max_rel(results[1], results[0]) <= 1e-6
    assert lrs[0] != 2e-2 and len(lrs) == 2


@pytest.mark.parametrize("kwargs, name", [
    (dict(page_size=0), "page_size"), (dict(page_size=-8), "page_size"), (dict(page_size=4), "page_size"),
    (dict(page_size=12), "page_size"), (dict(device_budget=-1), "device_budget"),
    (dict(page_size=4096, device_budget=100), "device_budget"), (dict(lr=-1.0), "lr"),
    (dict(betas=(0.9, 1.0)), "betas"),
])
def test_nonsense_sizes_are_clear_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PagedAdamW(new_model().parameters(), **kwargs)
    with pytest.raises(TypeError, match="page_size"):
        PagedAdamW(new_model().parameters(), page_size=1024.0)


def test_long_sequence_spike_completes_only_with_paging():
    demo = long_sequence_demo(long_len=96, n_short=3, long_at=2)
    long_step = demo.steps[2]
    assert demo.unpaged_oom_step == 2  # plain AdamW: full state + the spike exceed the device
    assert len(demo.steps) == 4 and [s.fits_unpaged for s in demo.steps] == [True, True, False, True]
    assert long_step.seq_len == 96 and long_step.pages_out > 0 and long_step.pages_in == long_step.pages_out
    assert long_step.resident_at_peak < demo.state_bytes
    assert long_step.resident_at_peak + long_step.activation_peak + demo.fixed_bytes <= demo.device_bytes
    assert all(s.pages_in == s.pages_out == 0 for i, s in enumerate(demo.steps) if i != 2)
    assert demo.max_used_bytes <= demo.device_bytes
    assert demo.total_bytes_moved == (demo.total_pages_in + demo.total_pages_out) * demo.page_size
    assert demo.max_param_rel_diff <= 1e-6


def test_lora_adapters_share_pages_and_train_like_adamw_with_checkpointing():
    from minilora import add_lora

    def lora_model(ckpt):
        torch.manual_seed(0)
        m = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32, dropout=0.1,
                          gradient_checkpointing=ckpt))
        return add_lora(m, ["c_attn", "c_fc"], r=4, alpha=8)

    data = batches(10)
    plain = lora_model(False)
    torch.manual_seed(5)
    train(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], **HP), data)
    model = lora_model(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(trainable, **HP, page_size=1024, device_budget=2048)
    # 16 small adapters laid end to end: the pages hold them with less than one page of slack
    assert 0 <= opt.state_nbytes() - 8 * sum(p.numel() for p in trainable) < 1024
    torch.manual_seed(5)
    train(model, opt, data)
    assert max_rel(model, plain) <= 1e-6 and opt.stats.pages_in > 0


def test_bf16_parameter_updates_in_fp32_then_rounds():
    torch.manual_seed(0)
    p32 = torch.randn(1000)
    g = torch.randn(1000)
    p = torch.nn.Parameter(p32.bfloat16())
    p.grad = g.bfloat16()
    opt = PagedAdamW([p], **HP, page_size=1024, device_budget=1024)
    opt.step()
    ref = torch.nn.Parameter(p32.bfloat16().float())
    ref.grad = g.bfloat16().float()
    torch.optim.AdamW([ref], **HP).step()
    assert torch.equal(p.detach(), ref.detach().bfloat16())
    assert all(t.dtype == torch.float32 for t in opt.pager.on_host.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host pages and copy streams need CUDA")
def test_cuda_pages_pinned_prefetched_and_equal_to_adamw():
    data = [b.cuda() for b in batches(20)]
    results = []
    for paged in (False, True):
        model = new_model().cuda()
        opt = (PagedAdamW(model.parameters(), **HP, page_size=PAGE, device_budget=quarter_budget(model)) if paged
               else torch.optim.AdamW(model.parameters(), **HP, foreach=False))
        results.append(train(model, opt, data))
    assert max_rel(results[1], results[0]) <= 1e-6
    assert opt.pager.on_host and all(t.is_pinned() for t in opt.pager.on_host.values())
    assert all(t.is_cuda for t in opt.pager.on_device.values())
    assert opt.stats.pages_in > 0 and opt.stats.peak_resident_bytes <= quarter_budget(results[1])
    assert opt.state_dict()["state"][0]["exp_avg"].device.type == "cpu"


def test_pager_pages_any_dtype_and_reports_its_bytes():
    from minilora.optim.pager import Pager

    pager = Pager((3, 5), torch.uint8, "cpu", device_budget=40)  # 15-byte pages, room for 2
    assert (pager.page_size, pager.capacity, pager.capacity_bytes) == (15, 2, 30)
    for pid in range(3):  # the third page evicts page 0, the least recently used
        (page,) = pager.acquire([pid])
        assert page.dtype == torch.uint8 and torch.equal(page, torch.zeros(3, 5, dtype=torch.uint8))
        page.fill_(pid + 7)
        pager.release([pid])
    assert list(pager.on_device) == [1, 2] and list(pager.on_host) == [0]
    assert (pager.resident_bytes, pager.host_bytes, pager.stats.peak_resident_bytes) == (30, 15, 30)
    assert torch.equal(pager.read(0), torch.full((3, 5), 7, dtype=torch.uint8))
    pager.set_budget(None)
    assert pager.capacity_bytes is None and pager.resident_bytes == 30
    with pytest.raises(ValueError, match="page_shape"):
        Pager((0, 5), torch.uint8, "cpu", None)
    with pytest.raises(ValueError, match="device_budget"):
        Pager((3, 5), torch.uint8, "cpu", 14)
