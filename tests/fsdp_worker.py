"""One rank of a sharded (FSDP) fine-tune, for tests/test_fsdp.py.

    python -m torch.distributed.run --nproc_per_node N tests/fsdp_worker.py OUT '[{"name": ..., "cfg": {...}}]'

Trains the listed runs one after another on a 4-block GPT (the same base and data in every process), each in
its run directory OUT/<name> (the adapter, checkpoint and metrics.json that rank 0 writes). Rank 0 also
writes OUT/<name>.json: the run's extra report and what it measured of the quantized base, in bytes:

    local     this rank's shards of every NF4 tensor (packed codes, absmax codes, nested absmax, offset)
    whole     the same tensors whole (what one process holds)
    peak      the most NF4 bytes this rank held at once: its shards plus every block gathered at that moment,
              sampled each time a quantized matmul runs (forward, and dX in backward)
    block     the largest block's NF4 bytes, whole

A run may say "kill": {"rank": r, "after": s}: rank r writes OUT/<name>.killed (the time) after step s (and
its checkpoint) and kills itself with SIGKILL, as a crashed machine would. "resume": true resumes the run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # ddp_worker.py, beside this file
from ddp_worker import tiny_data  # noqa: E402
from minilora import GPT, GPTConfig, nf4_linear  # noqa: E402
from minilora.data import ByteTokenizer  # noqa: E402,F401  (tests/test_fsdp.py saves it with the base)
from minilora.parallel import rank  # noqa: E402
from minilora.parallel.fsdp import SHARDED_NF4  # noqa: E402
from minilora.train import TrainConfig, prepare_model, train  # noqa: E402

CONFIG = GPTConfig(block_size=192, vocab_size=257, n_layer=4, n_head=2, n_embd=16, dropout=0.0)


def tiny_base() -> GPT:
    """A small random 4-block GPT, identical in every process (fixed seed)."""
    torch.manual_seed(1234)
    return GPT(dataclasses.replace(CONFIG))  # its own config: training switches checkpointing on in it


def nf4_tensors(model: torch.nn.Module) -> list[tuple[int, str, torch.Tensor]]:
    """(block index or -1, name, tensor) of every NF4 tensor in model, as its module holds it now."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nf4_linear.NF4Linear):
            block = int(name.split(".")[2]) if name.startswith("transformer.h.") else -1
            out += [(block, f"{name}.{n}", getattr(m, n)) for n in (*SHARDED_NF4, "offset") if getattr(m, n) is not None]
    return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class BaseMeter:
    """Samples the NF4 bytes a rank holds whenever a quantized matmul runs (its block is gathered then)."""

    def __init__(self):
        self.model, self.local, self.peak = None, 0, 0
        for fn in ("_base_forward", "_base_matmul_dx"):
            real = getattr(nf4_linear, fn)
            setattr(nf4_linear, fn, lambda *a, _real=real, **kw: (self.sample(), _real(*a, **kw))[1])

    def start(self, model) -> None:
        self.model, self.peak = model, 0
        self.local = sum(nbytes(t.to_local() if hasattr(t, "to_local") else t) for _, _, t in nf4_tensors(model))

    def sample(self) -> None:
        if self.model is not None:  # gathered tensors are plain ones; the shards stay besides them
            gathered = sum(nbytes(t) for _, n, t in nf4_tensors(self.model) if not hasattr(t, "to_local")
                           and not n.endswith(".offset"))
            self.peak = max(self.peak, self.local + gathered)


METER: BaseMeter | None = None  # made by main(): the test process that imports this file stays unpatched


def run(name: str, spec: dict, out: Path) -> None:
    cfg = TrainConfig(**{"progress": False, "out_dir": str(out / name), **spec["cfg"]})
    kill = spec.get("kill")

    def callback(step: int, loss: float) -> None:
        if kill and step == kill["after"] and rank() == kill["rank"]:
            (out / f"{name}.killed").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    model = tiny_base()
    from minilora.parallel import fsdp
    real_init = fsdp.FullyShardedDataParallel.__init__

    def init(self, m, *a, **kw):  # measure the model once it is sharded
        real_init(self, m, *a, **kw)
        METER.start(m)
    fsdp.FullyShardedDataParallel.__init__ = init
    try:
        res = train(model, cfg, tiny_data(), resume=spec.get("resume", False), callback=callback)
    finally:
        fsdp.FullyShardedDataParallel.__init__ = real_init
    tensors = nf4_tensors(res.model)
    whole = sum(t.numel() * t.element_size() for _, _, t in tensors)  # a DTensor's numel is the whole one
    blocks = {}
    for b, _, t in tensors:
        blocks[b] = blocks.get(b, 0) + t.numel() * t.element_size()
    if rank() == 0:
        info = {"extra": res.extra, "losses": res.losses, "local": METER.local, "whole": whole, "peak": METER.peak,
                "block": max(blocks.values(), default=0)}
        (out / f"{name}.json").write_text(json.dumps(info))
    METER.model = None


PARTS = ("weights", "quantized_weights", "gradients", "optimizer_state", "adapters", "adapter_gradients",
         "adapter_optimizer_state", "gathered", "activations")


def measure(name: str, spec: dict, out: Path) -> None:
    """One step measured on each rank (minilora.parallel.fsdp's measure); rank 0 writes OUT/<name>.json with its parts.
    The global batch: spec["cfg"]["batch_size"] random sequences of spec["seq"] tokens, rank r takes rows r::N."""
    from minilora.parallel import init_from_env, world_size
    init_from_env()  # train() joins the process group itself; here it is joined by hand
    from minilora.parallel.fsdp import FullyShardedDataParallel
    from minilora.train import make_optimizer
    cfg = TrainConfig(**{"progress": False, **spec["cfg"]})
    model = prepare_model(tiny_base(), cfg)
    rep = FullyShardedDataParallel(model)
    x = torch.randint(CONFIG.vocab_size, (cfg.batch_size, spec["seq"]), generator=torch.Generator().manual_seed(0))
    x = x[rank()::world_size()]
    m = rep.measure(make_optimizer(model, cfg), (x, x))
    if rank() == 0:
        (out / f"{name}.json").write_text(json.dumps({k: getattr(m, k) for k in (*PARTS, "total")}))


def single(name: str, cfg: dict, out: Path):
    """The same run in this one process, without FSDP: the reference."""
    return train(tiny_base(), TrainConfig(**{"progress": False, "out_dir": str(out / name), **cfg}), tiny_data())


def single_model(cfg: dict) -> torch.nn.Module:
    """The model a run trains, prepared (LoRA / NF4 + adapters) in this process, unsharded."""
    return prepare_model(tiny_base(), TrainConfig(**{"progress": False, **cfg}))


def main() -> None:
    global METER
    METER = BaseMeter()
    out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for spec in runs:
        (measure if "seq" in spec else run)(spec["name"], spec, out)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
