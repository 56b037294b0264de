"""NF4 matmuls against bf16 torch.matmul, dequantize-then-matmul and bitsandbytes, on one NF4 weight.

On a CUDA GPU, for each weight shape (N out_features x K in_features), each M and each pass
(forward Y = X · Wᵀ, input gradient dX = dY · W), it times
    minilora   minilora.kernels.nf4_matmul / nf4_matmul_dx (decode kernels for M <= 16, tiles above)
    deq+mm     minilora.kernels.nf4_dequantize to bf16, then torch.matmul
    bnb        bitsandbytes.matmul_4bit (its gemv_4bit kernel at M = 1 in the forward); for dX
               bitsandbytes' own backward: dequantize_4bit, then torch.matmul
    bf16       torch.matmul with the dequantized weight in bf16
all on the same weight, quantized once by bitsandbytes (NF4, blocksize 64, double quantization),
and prints the ratio time(bf16) / time(approach) (> 1: faster than bf16) and the bytes the
minilora kernel moves (kernels/roofline.py) per second as a fraction of the GPU's peak bandwidth,
next to the roofline model's best ratio. Every approach is captured in a CUDA graph and its replays
timed by triton.testing.do_bench (median, L2 cleared before each replay).

    python benchmarks/kernel_speed.py                        # the full table (CUDA)
    python benchmarks/kernel_speed.py --shapes 4096x4096 --tokens 1 16
    python benchmarks/kernel_speed.py --dry-run              # CPU: tiny shapes, wall-clock times,
                                                             # checks the whole pipeline, not speed
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]   # (N out_features, K in_features)
TOKENS = [1, 4, 16, 64, 512, 4096]
DRY_SHAPES, DRY_TOKENS = [(48, 264)], [1, 3, 20]
APPROACHES = ("minilora", "deq+mm", "bnb", "bf16")


def shape_arg(text: str) -> tuple:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes takes NxK with two positive integers, e.g. 4096x11008; got {text!r}")
    if n <= 0 or k <= 0:
        raise argparse.ArgumentTypeError(f"--shapes takes positive sizes, got {text!r}")
    return n, k


def peak_bandwidth(device: torch.device):
    """(bytes/s, where the figure comes from) for the GPU, or (None, reason)."""
    from minilora.kernels import roofline
    name = torch.cuda.get_device_name(device)
    for key, dev in roofline.DEVICES.items():
        if key in name:
            return dev.bandwidth, f"{dev.name} datasheet"
    props = torch.cuda.get_device_properties(device)
    clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and width:     # kHz, bits; double data rate
        return 2 * clock * 1e3 * width / 8, "memory clock x bus width"
    return None, f"peak bandwidth of {name} unknown"


def have_bnb() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
        return True
    except ImportError:
        return False


def bnb_weight(N: int, K: int, device: torch.device, seed: int = 0):
    """(W as bf16 after the NF4 round trip, bitsandbytes' packed weight and state, minilora's kwargs).
    Without bitsandbytes, minilora's quantize_nf4 makes the weight (packed, state = None)."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device=device, dtype=torch.bfloat16)
    if not have_bnb():
        from minilora import dequantize_nf4, quantize_nf4
        st = quantize_nf4(W, blocksize=64, double_quant=True)
        q = dict(packed=st.packed, absmax=st.absmax, code=st.code, nested_absmax=st.nested_absmax,
                 nested_code=st.nested_code, offset=st.offset, blocksize=64)
        return dequantize_nf4(st).to(torch.bfloat16), None, None, q
    import bitsandbytes.functional as F
    packed, st = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True, blocksize=64)
    q = dict(packed=packed, absmax=st.absmax, code=st.code, nested_absmax=st.state2.absmax,
             nested_code=st.state2.code, offset=st.offset, blocksize=64)
    return F.dequantize_4bit(packed, st).to(torch.bfloat16), packed, st, q


def approaches(pass_: str, x, W, packed, st, q, N: int, K: int) -> dict:
    """name -> zero-argument callable computing the pass (no "bnb" without bitsandbytes)."""
    from minilora.kernels import nf4_dequantize, nf4_matmul, nf4_matmul_dx
    deq = lambda: nf4_dequantize(**q, shape=(N, K), dtype=torch.bfloat16)  # noqa: E731
    if pass_ == "fwd":
        fns = {"minilora": lambda: nf4_matmul(x, **q, N=N, K=K),
               "deq+mm": lambda: torch.matmul(x, deq().T),
               "bf16": lambda: torch.matmul(x, W.T)}
    else:
        fns = {"minilora": lambda: nf4_matmul_dx(x, **q, N=N, K=K),
               "deq+mm": lambda: torch.matmul(x, deq()),
               "bf16": lambda: torch.matmul(x, W)}
    if packed is not None:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        xin = x[0] if x.shape[0] == 1 else x          # a vector takes bitsandbytes' gemv_4bit path
        fns["bnb"] = ((lambda: bnb.matmul_4bit(xin, packed.t(), quant_state=st)) if pass_ == "fwd" else
                      (lambda: torch.matmul(x, F.dequantize_4bit(packed, st).to(x.dtype))))
    return fns


def gpu_seconds(fn) -> float:
    """Median seconds of one replay of `fn` captured in a CUDA graph (L2 cleared before each)."""
    from triton.testing import do_bench
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # compile and warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=10, rep=40, return_mode="median") * 1e-3


def cpu_seconds(fn) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def header(dry: bool) -> str:
    what = "wall s (CPU)" if dry else "minilora GB/s"
    return (f"{'pass':<5}{'N x K':>12} {'M':>5} | {'minilora':>8} {'deq+mm':>7} {'bnb':>6} | {'vs bnb':>6}"
            f" | {what:>13} {'of peak':>7} | {'model':>5} {'rel.err':>8}")


def row_text(r: dict) -> str:
    ratio = {a: r["t"]["bf16"] / r["t"][a] for a in APPROACHES if a in r["t"]}
    if "bnb" not in ratio:                            # bitsandbytes not installed: its cells stay empty
        return row_text(dict(r, t=dict(r["t"], bnb=float("nan"))))
    gbs = f"{r['moved'] / r['t']['minilora'] / 1e9:13.0f}" if r["peak"] else f"{r['t']['minilora']:13.4f}"
    frac = f"{r['moved'] / r['t']['minilora'] / r['peak']:7.0%}" if r["peak"] else f"{'-':>7}"
    return (f"{r['pass']:<5}{r['N']:>6}x{r['K']:<5} {r['M']:>5} | {ratio['minilora']:8.2f} {ratio['deq+mm']:7.2f}"
            f" {ratio['bnb']:6.2f} | {r['t']['bnb'] / r['t']['minilora']:6.2f} | {gbs} {frac} |"
            f" {r['model']:5.2f} {r['err']:8.1e}")


def run(shapes, tokens, device: torch.device, timer, peak) -> list:
    from minilora.kernels import roofline
    model_device = roofline.DEVICES["H100"]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        model_device = next((d for k, d in roofline.DEVICES.items() if k in name), model_device)
    rows = []
    for N, K in shapes:
        W, packed, st, q = bnb_weight(N, K, device)
        for M in tokens:
            g = torch.Generator().manual_seed(M)
            for pass_ in ("fwd", "dX"):
                x = torch.randn(M, K if pass_ == "fwd" else N, generator=g).to(device=device, dtype=torch.bfloat16)
                fns = approaches(pass_, x, W, packed, st, q, N, K)
                ref = fns["bf16"]().double()
                err = ((fns["minilora"]().double() - ref).norm() / ref.norm()).item()
                kind = "decode" if M <= 16 and K % 8 == 0 else "tiles"
                r = dict(pass_=pass_, N=N, K=K, M=M, err=err, peak=peak,
                         moved=roofline.bytes_moved(kind, pass_, M, N, K, model_device),
                         model=roofline.predicted_ratio(kind, pass_, M, N, K, model_device),
                         t={a: timer(fn) for a, fn in fns.items()})
                r["pass"] = r.pop("pass_")
                rows.append(r)
                print(row_text(r), flush=True)
        del W, packed, st, q
    return rows


def measure(out_png: str = "", shapes=SHAPES, tokens=TOKENS) -> list:
    """The CUDA table (out_png is accepted for benchmarks/speed.py and not used)."""
    import triton
    dev = torch.device("cuda")
    peak, source = peak_bandwidth(dev)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}; "
          f"peak bandwidth {'%.2f TB/s' % (peak / 1e12) if peak else '?'} ({source})")
    print("ratios = time(bf16 torch.matmul) / time(approach), > 1 is faster than bf16; vs bnb = time(bnb) /"
          " time(minilora); model = the roofline model's best ratio for minilora")
    if not have_bnb():
        print("bitsandbytes is not installed: the weight comes from minilora.quantize_nf4, the bnb columns are nan")
    print(header(False))
    return run(shapes, tokens, dev, gpu_seconds, peak)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=shape_arg, nargs="+", help="NxK weight shapes (default: the four above)")
    ap.add_argument("--tokens", type=int, nargs="+", help="values of M (default: 1 4 16 64 512 4096)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercise the pipeline, time nothing")
    args = ap.parse_args(argv)
    if args.tokens and min(args.tokens) < 1:
        ap.error(f"--tokens must be positive, got {args.tokens}")
    if args.dry_run:
        print("dry run on the CPU: tiny shapes, wall-clock seconds of single calls (no speed measured)\n"
              + header(True))
        run(args.shapes or DRY_SHAPES, args.tokens or DRY_TOKENS, torch.device("cpu"), cpu_seconds, None)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (try --dry-run; the roofline model is printed by "
              "benchmarks/kernel_report.py --model-only)")
        return 0
    measure(shapes=args.shapes or SHAPES, tokens=args.tokens or TOKENS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
