"""Sharded (FSDP) fine-tuning with the real launcher and gloo, on a 4-block GPT, 2 and 4 processes.

- N ranks train the same adapters, losses and checkpoint tensors (<= 1e-5 relative, fp32) as one process: LoRA
  with gradient accumulation, QLoRA with gradient checkpointing and uneven shards, full fine-tuning; rank 0
  writes the files one process writes.
- Each rank holds its 1/N shard of the NF4 base, plus one block gathered at a time (measured in the matmuls);
  one measured step of rank 0 agrees with minilora.memory.estimate(..., fsdp=N) part by part (<= 5 %).
- A rank killed after a checkpoint stops the run through torchrun, not the collective timeout; the checkpoint
  stays whole, and 2 ranks, or 4, resume what 2 started, to the uninterrupted single-process run.
- The command line: torchrun ... -m minilora finetune --fsdp writes what the single-process command writes.
"""
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from minilora import parallel as D
from minilora.runs.train_state import find_checkpoint, read_state

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker  # noqa: E402
from test_distributed import GUARD, finish, no_leftover_processes, torchrun  # noqa: E402,F401

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with gloo")

RUNS = {  # name: TrainConfig settings; global batch = batch_size * grad_accum, rank r takes every N-th example
    "lora": dict(mode="lora", r=2, steps=4, batch_size=4, grad_accum=2, lr=1e-2),
    "qlora": dict(mode="qlora", r=2, steps=4, batch_size=5, lr=1e-2, gradient_checkpointing=True),  # uneven
    "full": dict(mode="full", steps=3, batch_size=4, lr=1e-3),
    "crash": dict(mode="qlora", r=2, steps=6, batch_size=4, lr=1e-2, save_every=2),
}
ON = {"fsdp": True}
MEASURED = {"measure_lora": dict(mode="lora", r=2, batch_size=4), "measure_qlora": dict(mode="qlora", r=2, batch_size=5)}
SEQ = 64  # tokens per sequence of the measured step


def spec(name: str, **extra) -> dict:
    return {"name": name, "cfg": {**RUNS[name], **ON}, **extra}


MEASURE = [{"name": name, "cfg": {**cfg, **ON}, "seq": SEQ} for name, cfg in MEASURED.items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 ranks: the measured steps, lora, qlora, full, then crash (rank 1 killed after step 4); 4 ranks: the
    measured steps, lora, qlora; crash resumed by 2 ranks and by 4; one process: every run, uninterrupted."""
    out = tmp_path_factory.mktemp("fsdp")
    two = torchrun(str(Path(fsdp_worker.__file__)), str(out / "n2"),
                   json.dumps([*MEASURE, spec("lora"), spec("qlora"), spec("full"),
                               spec("crash", kill={"rank": 1, "after": 4})]),
                   env={D.TIMEOUT_ENV: str(GUARD)})
    ended = {}
    waiter = threading.Thread(target=lambda: ended.update(log=finish(two), at=time.time()))  # when torchrun ends
    waiter.start()
    for name, cfg in RUNS.items():  # meanwhile, one process
        fsdp_worker.single(name, cfg, out / "n1")
    waiter.join()
    log2, stopped = ended["log"], ended["at"]
    assert (out / "n2" / "crash" / "checkpoint").is_dir(), log2
    for n in (2, 4):  # 2 ranks, and 4, continue what 2 ranks started, each from its own copy
        shutil.copytree(out / "n2" / "crash", out / f"resumed{n}" / "crash")
    crashed = read_state(find_checkpoint(out / "n2" / "crash"))
    four = torchrun(str(Path(fsdp_worker.__file__)), str(out / "n4"),
                    json.dumps([*MEASURE, spec("lora"), spec("qlora")]), nproc=4)
    log4 = finish(four)
    assert four.returncode == 0, log4
    for n in (2, 4):
        p = torchrun(str(Path(fsdp_worker.__file__)), str(out / f"resumed{n}"),
                     json.dumps([spec("crash", resume=True)]), nproc=n)
        log = finish(p)
        assert p.returncode == 0, log
    return dict(out=out, log2=log2, code2=two.returncode, stopped=stopped, crashed=crashed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("n,name", [(2, "lora"), (2, "qlora"), (2, "full"), (4, "lora"), (4, "qlora")])
def test_sharded_ranks_train_what_one_process_trains(runs, n, name):
    sharded, single = runs["out"] / f"n{n}" / name, runs["out"] / "n1" / name
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    result = "model/model.safetensors" if name == "full" else "adapter/adapter_model.safetensors"
    a, b = load_file(str(sharded / result)), load_file(str(single / result))
    assert a.keys() == b.keys() and all(("lora_" in k) == (name != "full") for k in a)
    # full fine-tuning: the key bias of c_attn has a gradient of pure rounding noise (softmax ignores a shift
    # shared by all keys), so Adam steps it either way; measured 8.5e-6 relative, as under DDP
    tol = 1e-4 if name == "full" else 1e-5
    assert max(rel(a[k], b[k]) for k in a) <= tol
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (sharded, single))
    assert ma["losses"] == pytest.approx(mb["losses"], rel=1e-5)
    assert json.loads((runs["out"] / f"n{n}" / f"{name}.json").read_text())["extra"] == {
        "world_size": n, "rank": 0, "fsdp": True, "comm": pytest.approx({"grad_bytes": 0, "grad_buckets": 0,
                                                                         "scalar_bytes": len(ma["losses"]) * 24})}
    for f in ("trainable", "optimizer"):  # the checkpoint holds whole tensors, as one process writes them
        ca, cb = (load_file(str(d / "checkpoint" / f"{f}.safetensors")) for d in (sharded, single))
        assert ca.keys() == cb.keys()
        assert max(rel(ca[k], cb[k]) for k in ca if ca[k].dim()) <= tol


@pytest.mark.parametrize("n", [2, 4])
def test_each_rank_holds_its_shard_of_the_nf4_base(runs, n):
    m = json.loads((runs["out"] / f"n{n}" / "qlora.json").read_text())
    model = fsdp_worker.single_model(RUNS["qlora"])  # the unsharded model: its NF4 tensors, whole
    tensors = fsdp_worker.nf4_tensors(model)
    whole = sum(fsdp_worker.nbytes(t) for _, _, t in tensors)
    shard0 = sum(-(-t.shape[0] // n) * t[0].numel() * t.element_size() if t.dim() else fsdp_worker.nbytes(t)
                 for _, _, t in tensors)  # rank 0's chunk of every tensor (torch.chunk: ⌈rows/N⌉); offsets whole
    block = max(sum(fsdp_worker.nbytes(t) for b, _, t in tensors if b == i) for i in range(4))
    assert m["whole"] == whole and m["block"] == block
    assert m["local"] == shard0 < whole / n * 1.1
    assert m["local"] < m["peak"] <= m["local"] + block  # one block gathered at a time, checkpointing included


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", MEASURED)
def test_measured_step_matches_the_estimate(runs, n, name):
    """Each part of one measured step of rank 0 (its shards, gradients, AdamW state, the root and largest block
    while gathered, its activations) against minilora.memory.estimate(..., fsdp=n), within 5 %."""
    from minilora.memory import estimate
    m = json.loads((runs["out"] / f"n{n}" / f"{name}.json").read_text())
    cfg = MEASURED[name]
    e = estimate(fsdp_worker.CONFIG, cfg["mode"], batch_size=cfg["batch_size"], seq_len=SEQ, r=cfg["r"],
                 dtype="float32", compute_dtype="float32", device="cpu", fsdp=n)
    for part in (*fsdp_worker.PARTS, "total"):
        assert m[part] == pytest.approx(getattr(e, part), rel=0.05), part
    assert m["gathered"] > 0 and m["adapters"] < m["gathered"]
    if cfg["mode"] == "qlora":  # rank 0's NF4 shards: 1/n of the whole, to the padding of each tensor
        whole = estimate(fsdp_worker.CONFIG, "qlora", batch_size=cfg["batch_size"], seq_len=SEQ, r=cfg["r"],
                         dtype="float32", compute_dtype="float32", device="cpu").quantized_weights
        assert whole / n <= m["quantized_weights"] <= whole / n * 1.1


@pytest.mark.parametrize("n", [2, 4])
def test_killed_rank_stops_the_run_and_it_resumes(runs, n):
    assert runs["code2"] != 0
    log = runs["log2"]
    assert "SIGKILL" in log and "FAILED" in log, log  # torchrun names the rank and its signal
    killed = float((runs["out"] / "n2" / "crash.killed").read_text())
    # the collective timeout is GUARD seconds; torchrun stops the other rank long before that
    assert runs["stopped"] - killed < GUARD / 4
    assert runs["crashed"]["step"] == 4  # the checkpoint of the step the rank died after, whole (hashes verified)
    resumed, single = runs["out"] / f"resumed{n}" / "crash", runs["out"] / "n1" / "crash"
    a = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(rel(a[k], b[k]) for k in a) <= 1e-5
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (resumed, single))
    assert len(ma["losses"]) == RUNS["crash"]["steps"]
    assert ma["losses"] == pytest.approx(mb["losses"], rel=1e-5)


def test_command_line_fsdp_writes_what_one_process_writes(tmp_path):
    base = tmp_path / "base"
    fsdp_worker.tiny_base().save_pretrained(base)
    fsdp_worker.ByteTokenizer().save(base)
    args = ["finetune", "--base", str(base), "--mode", "qlora", "--steps", "4", "--n-train", "24", "--n-val", "4",
            "--batch-size", "4", "--lora-r", "2", "--gradient-checkpointing", "--no-progress"]
    p = torchrun("-m", "minilora", *args, "--fsdp", "--out", str(tmp_path / "fsdp"))
    from minilora.__main__ import main
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    log = finish(p)
    assert p.returncode == 0, log
    assert log.count("exact match") == 1  # rank 0 alone reports
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("fsdp", "single"))
    assert a.keys() == b.keys() and max(rel(a[k], b[k]) for k in a) <= 1e-5
    assert (json.loads((tmp_path / "fsdp" / "adapter" / "adapter_config.json").read_text())
            == json.loads((tmp_path / "single" / "adapter" / "adapter_config.json").read_text()))
