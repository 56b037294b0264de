"""A QLoRA training step against PEFT + bitsandbytes, and PagedAdamW against bitsandbytes' paged AdamW.

step   A stack of Llama-shaped MLP blocks (up: d -> f, down: f -> d, bias-free, bf16) with
       NF4 base weights (blocksize 64, double quantization) and rank-16 LoRA adapters on both:
       minilora's add_qlora against bitsandbytes' Linear4bit + peft.inject_adapter_in_model.
       One step = forward on M tokens, a squared-output loss, backward, torch AdamW on the
       adapters. Ratio = median step time of PEFT / median of minilora (> 1: minilora faster).
paged  The same AdamW update of `--paged-tensors` 4096 x 4096 fp32 parameters: minilora's
       PagedAdamW with a device budget of 25 % of its state (the rest waits in host memory)
       against bitsandbytes.optim.PagedAdamW (unified memory; it pages only under memory
       pressure, so here its state stays on the GPU). Ratio = bitsandbytes' step / minilora's.

    python benchmarks/qlora_vs_peft.py                 # CUDA: both sections
    python benchmarks/qlora_vs_peft.py --dry-run       # CPU, tiny sizes, minilora's side only:
                                                       # checks the code runs, measures nothing
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from minilora import PagedAdamW, add_qlora  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))


def blocks(d: int, f: int, layers: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(d, f) for _ in range(layers)]).to(torch.bfloat16)


def minilora_model(d, f, layers, device) -> nn.Module:
    model = blocks(d, f, layers).to(device)
    add_qlora(model, ["up", "down"], r=16, alpha=32.0, compute_dtype=torch.bfloat16)
    return model


def peft_model(d, f, layers, device) -> nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model
    model = blocks(d, f, layers)
    for block in model:
        for name in ("up", "down"):
            lin = getattr(block, name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            setattr(block, name, q)
    model = model.to(device)                        # bitsandbytes quantizes on the move to the GPU
    return inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                              target_modules=["up", "down"]), model)


def step_seconds(model: nn.Module, x: torch.Tensor, reps: int) -> float:
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{type(model).__name__} has no LoRA parameters to train")
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()
    return median_seconds(step, x.device, reps)


def median_seconds(fn, device: torch.device, reps: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(2):      # warm-up: compiles kernels, creates optimizer state
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def missing(*modules) -> list:
    import importlib.util
    return [m for m in modules if importlib.util.find_spec(m) is None]


def qlora_step(args, device, dry: bool) -> None:
    print(f"QLoRA step: {args.layers} blocks {args.d} -> {args.f} -> {args.d}, rank 16, bf16, "
          f"median of {args.reps} steps")
    for M in args.tokens:
        x = torch.randn(M, args.d, device=device, dtype=torch.bfloat16)
        t_mini = step_seconds(minilora_model(args.d, args.f, args.layers, device), x, args.reps)
        if dry or missing("peft", "bitsandbytes"):
            why = "CPU dry run" if dry else f"{', '.join(missing('peft', 'bitsandbytes'))} not installed"
            print(f"  M={M:<5} minilora {t_mini:.4f} s ({why}: PEFT + bitsandbytes not run, no ratio)")
            continue
        t_peft = step_seconds(peft_model(args.d, args.f, args.layers, device), x, args.reps)
        print(f"  M={M:<5} minilora {t_mini * 1e3:8.2f} ms  PEFT + bitsandbytes {t_peft * 1e3:8.2f} ms"
              f"  ratio {t_peft / t_mini:5.2f}", flush=True)


def paged(args, device, dry: bool) -> None:
    side = 64 if dry else 4096
    g = torch.Generator().manual_seed(0)

    def params():
        ps = [torch.randn(side, side, generator=g).to(device).requires_grad_() for _ in range(args.paged_tensors)]
        for p in ps:
            p.grad = torch.randn(side, side, generator=g).to(device) * 1e-3
        return ps
    opt = PagedAdamW(params(), lr=1e-3, page_size=2**16 if dry else 2**21)
    opt.set_device_budget(int(0.25 * opt.state_nbytes()) // opt.pager.page_size * opt.pager.page_size)
    t_mini = median_seconds(opt.step, device, args.reps)
    state_mb = opt.state_nbytes() / 2**20
    print(f"PagedAdamW: {args.paged_tensors} x {side} x {side} fp32, state {state_mb:.0f} MiB, device budget 25 %:"
          f" {t_mini * 1e3:.1f} ms per step")
    if dry or missing("bitsandbytes"):
        print(f"  ({'CPU dry run' if dry else 'bitsandbytes not installed'}: its paged AdamW not run, no ratio)")
        return
    import bitsandbytes as bnb
    opt_bnb = bnb.optim.PagedAdamW(params(), lr=1e-3)
    t_bnb = median_seconds(opt_bnb.step, device, args.reps)
    print(f"  bitsandbytes PagedAdamW (state on the GPU) {t_bnb * 1e3:.1f} ms per step: ratio {t_bnb / t_mini:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["step", "paged"], action="append")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 512])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--paged-tensors", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    for name in ("d", "f", "layers", "paged_tensors", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if min(args.tokens) < 1:
        ap.error(f"--tokens must be positive, got {args.tokens}")
    dry = args.dry_run
    if dry:
        args.d, args.f, args.layers, args.reps, args.paged_tensors = 64, 128, 2, 2, 4
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (try --dry-run)")
        return 0
    else:
        device = torch.device("cuda")
    for section in args.only or ["step", "paged"]:
        (qlora_step if section == "step" else paged)(args, device, dry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
