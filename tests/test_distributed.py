"""Data-parallel fine-tuning on torch.distributed, with the real launcher (torchrun) and gloo, 2 processes.

- 2 ranks over a global batch train the same adapters (<= 1e-5 relative) as one process over that batch:
  LoRA with gradient accumulation, LoRA with gradient checkpointing and uneven shards, QLoRA.
- The all-reduce carries exactly the adapters' gradient bytes each step, not the model's.
- A killed rank stops the run long before the collective timeout (torchrun); a hung rank makes the others give
  up after MINILORA_DIST_TIMEOUT; the last checkpoint stays intact, and the run resumes from it to the same
  adapters as an uninterrupted single-process run.

No wall-clock limit here assumes an idle machine: the waits are failure guards of minutes, and the hung-rank
timeout is scaled by how long this machine takes to start a Python process that imports minilora.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minilora import parallel as D
from minilora.runs.train_state import find_checkpoint, read_state

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402  (tests/ddp_worker.py: the same base model and data in every process)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with gloo")
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks' pids in /proc")

RUNS = [  # global batch = batch_size * grad_accum examples; each rank takes every second one
    {"name": "lora", "cfg": dict(mode="lora", r=2, steps=4, batch_size=4, grad_accum=2, lr=1e-2)},
    {"name": "checkpointing", "cfg": dict(mode="lora", r=2, steps=4, batch_size=5, lr=1e-2,
                                          gradient_checkpointing=True)},  # shards of 3 and 2 examples
    {"name": "qlora", "cfg": dict(mode="qlora", r=2, steps=4, batch_size=4, lr=1e-2)},
    {"name": "full", "cfg": dict(mode="full", steps=3, batch_size=4, lr=1e-3)},  # the contrast: every weight
]
ADAPTER_RUNS = [r["name"] for r in RUNS if r["cfg"]["mode"] != "full"]


def torchrun(*args: str, env: dict | None = None, nproc: int = 2) -> subprocess.Popen:
    """python -m torch.distributed.run with nproc local ranks on gloo, one thread each (2 cores)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--max-restarts", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    LAUNCHED.append(p)
    return p


LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """A failing test must not leave ranks running: kill each launcher's whole process group."""
    yield
    while LAUNCHED:
        p = LAUNCHED.pop()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


GUARD = 600  # seconds: only a run that is stuck takes this long, however busy the machine


def finish(p: subprocess.Popen, timeout: float = GUARD) -> str:
    out, _ = p.communicate(timeout=timeout)
    return out


def ranks(p: subprocess.Popen, n: int = 2, timeout: float = GUARD) -> dict[int, int]:
    """{rank: pid} of the launcher's n worker processes, once they exist."""
    t0 = time.monotonic()
    while len(found := _children_by_rank(p.pid)) < n:
        assert p.poll() is None, f"the launcher ended:\n{finish(p)}"
        assert time.monotonic() - t0 < timeout, f"only ranks {sorted(found)} after {timeout} s"
        time.sleep(0.05)
    return found


def _children_by_rank(launcher_pid: int) -> dict[int, int]:
    found = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for e in env:
            if e.startswith(b"RANK="):
                found[int(e[5:])] = int(d)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_checkpoint(p: subprocess.Popen, out_dir: Path, timeout: float = GUARD) -> int:
    """Step of the first checkpoint rank 0 writes in out_dir (fails if the run ends before)."""
    state, t0 = out_dir / "checkpoint" / "state.json", time.monotonic()
    while not state.exists():
        assert p.poll() is None, f"the run ended before writing a checkpoint:\n{finish(p)}"
        assert time.monotonic() - t0 < timeout, f"no checkpoint after {timeout} s"
        time.sleep(0.005)
    return json.loads(state.read_text())["step"]


# ----- 2 ranks == 1 process -----

@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """RUNS trained by 2 ranks under torchrun (rank 0's records) and by this process alone."""
    out = tmp_path_factory.mktemp("ddp")
    p = torchrun(str(Path(ddp_worker.__file__)), str(out / "ddp"), json.dumps(RUNS))
    single = {r["name"]: ddp_worker.run(r["name"], r["cfg"], out) for r in RUNS}  # meanwhile, one process
    log = finish(p)
    assert p.returncode == 0, log
    from safetensors.torch import load_file
    return {r["name"]: dict(ddp=json.loads((out / "ddp" / f"{r['name']}.json").read_text()),
                            ddp_params=load_file(str(out / "ddp" / f"{r['name']}.safetensors")),
                            single=single[r["name"]], single_params=load_file(str(out / f"{r['name']}.safetensors")))
            for r in RUNS}


@pytest.mark.parametrize("name", [r["name"] for r in RUNS])
def test_two_ranks_train_the_adapters_one_process_trains(ddp_runs, name):
    run = ddp_runs[name]
    a, b = run["ddp_params"], run["single_params"]
    assert a.keys() == b.keys()
    assert all("lora_" in k for k in a) == (name != "full")
    init = ddp_worker.initial_adapters(next(r["cfg"] for r in RUNS if r["name"] == name))
    # Full fine-tuning gets a looser bound: Adam's first steps move every weight by about ±lr whatever the size of
    # its gradient, and the key bias in c_attn has a gradient that is pure rounding noise (softmax ignores a shift
    # shared by all keys), so its elements step either way (measured: 7e-6 relative on c_attn.bias).
    tol = 1e-4 if name == "full" else 1e-5
    for k in a:
        rel = ((a[k] - b[k]).norm() / b[k].norm()).item()
        assert rel <= tol, (k, rel)
        assert ((b[k] - init[k]).norm() / b[k].norm()).item() > 1e-3, k  # the adapters did train
    assert run["ddp"]["losses"] == pytest.approx(run["single"]["losses"], rel=1e-5)
    assert run["ddp"]["extra"]["world_size"] == 2 and run["single"]["extra"]["world_size"] == 1


@pytest.mark.parametrize("name", ADAPTER_RUNS)
def test_allreduce_carries_the_adapter_gradients_only(ddp_runs, name):
    """Per step the gradient all-reduce moves exactly the adapters' gradient bytes (fp32 lora_A, lora_B)."""
    run = ddp_runs[name]["ddp"]
    steps = len(run["losses"])
    comm, adapter = run["extra"]["comm"], run["adapter_bytes"]
    assert adapter == 4 * sum(t.numel() for t in ddp_runs[name]["ddp_params"].values())
    assert comm["grad_bytes"] == steps * adapter        # once per step, even with gradient accumulation
    assert comm["grad_bytes"] / steps < run["model_bytes"] / 4  # the (NF4) base is never in it
    assert comm["scalar_bytes"] == steps * 3 * 8        # token count, loss, tokens: three float64 per step


def test_full_finetuning_all_reduces_every_weight(ddp_runs):
    run = ddp_runs["full"]["ddp"]
    steps, weights = len(run["losses"]), run["adapter_bytes"]  # every parameter trains here
    assert run["extra"]["comm"]["grad_bytes"] == steps * weights
    lora = ddp_runs["lora"]["ddp"]
    assert lora["adapter_bytes"] < weights / 4  # what LoRA saves on the wire, at this tiny size


# ----- pieces, in this process -----

def test_shards_partition_every_batch():
    idx = [7, 3, 3, 9, 1]
    parts = [D.shard(idx, r, 2) for r in range(2)]
    assert parts == [[7, 3, 1], [3, 9]]
    assert sorted(sum(parts, [])) == sorted(idx)
    with pytest.raises(ValueError, match="batch_size >= 3"):
        D.shard([1, 2], 0, 3)
    with pytest.raises(ValueError, match="rank"):
        D.shard(idx, 2, 2)


def test_single_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not D.init_from_env() and D.world_size() == 1 and D.is_main()
    model = torch.nn.Linear(2, 2)
    one = D.replicas(model)
    assert type(one) is D.SingleProcess  # what the training loop gets in one process
    for par in (one, D.DataParallel(model)):
        assert par.model is model and par.is_main and par.shard([4, 5, 6]) == [4, 5, 6]
        assert par.total(3) == 3 and par.total(1.5, 2) == (1.5, 2)
        with par.sync(False):
            model(torch.ones(1, 2)).sum().backward()
        par.barrier()
        assert par.report() == {"world_size": 1, "rank": 0, "comm": D.CommStats().as_dict()}


def test_timeout_setting(monkeypatch):
    monkeypatch.setenv(D.TIMEOUT_ENV, "7.5")
    assert D.timeout_seconds() == 7.5 and D.timeout_seconds(2) == 2.0
    monkeypatch.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=D.TIMEOUT_ENV):
        D.timeout_seconds()
    with pytest.raises(ValueError, match="timeout"):
        D.timeout_seconds(0)


def test_qlora_frozen_base_is_left_out_of_ddp():
    """Everything DDP must not touch: frozen weights and every buffer (the NF4 codes and constants)."""
    from minilora.train import TrainConfig, prepare_model
    model = prepare_model(ddp_worker.tiny_base(), TrainConfig(mode="qlora", r=2))
    ignored = set(D.frozen_names(model))
    sd = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    everything = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert ignored | trainable == everything and not ignored & trainable
    assert any(sd[n].dtype == torch.uint8 for n in ignored)  # the packed NF4 weights are among them
    assert D.trainable_bytes(model) == sum(sd[n].numel() * 4 for n in trainable)


# ----- a rank that dies or hangs; resume -----

# The adapter's settings are the test's own, not the demo's defaults: with alpha / r = 8 two ranks and one process
# end 1.5e-7 to 7.9e-7 apart (relative) after 150 steps, with alpha / r = 32 up to 3e-5 (Adam carries the rounding).
CLI = ["--n-train", "48", "--n-val", "8", "--batch-size", "4", "--lora-r", "2", "--alpha", "16", "--targets", "c_attn",
       "c_fc", "--warmup-steps", "2", "--save-every", "4", "--no-progress"]
STEPS = 150  # about 3 s of training at ~20 ms a step: time to kill a rank between the first checkpoint and the end


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    ddp_worker.tiny_base().save_pretrained(d)
    ddp_worker.ByteTokenizer().save(d)
    return d


@linux_only
def test_killed_rank_stops_the_run_and_it_resumes(base_dir, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "minilora", "finetune", "--base", str(base_dir), "--out", str(out), "--steps", str(STEPS), *CLI]
    p = torchrun(*args, env={D.TIMEOUT_ENV: str(GUARD)})
    pids = ranks(p)
    saved = wait_for_checkpoint(p, out)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    log = finish(p)
    stopped = time.monotonic() - t0
    assert stopped < GUARD / 4, f"the run took {stopped:.1f} s to stop: it waited for a timeout, torchrun did not stop it"
    assert p.returncode != 0
    assert "minilora FAILED" in log and "SIGKILL" in log, log  # torchrun names the rank and the signal
    assert not alive(pids[0])

    state = read_state(find_checkpoint(out))  # hashes verified: the last checkpoint is whole
    assert saved <= state["step"] < STEPS and state["step"] % 4 == 0
    assert not (out / "metrics.json").exists()

    p = torchrun(*args, "--resume")
    from minilora.__main__ import main  # meanwhile: the same run, uninterrupted, in one process
    assert main(["finetune", "--base", str(base_dir), "--out", str(tmp_path / "single"), "--steps", str(STEPS),
                 *CLI]) == 0
    log = finish(p)
    assert p.returncode == 0, log
    assert log.count("exact match") == 1  # rank 0 alone reports

    from safetensors.torch import load_file
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == single.keys()
    for k in single:
        err = ((resumed[k] - single[k]).norm() / single[k].norm()).item()
        assert err <= 1e-5, k
    m_resumed = json.loads((out / "metrics.json").read_text())
    m_single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert len(m_resumed["losses"]) == STEPS
    assert m_resumed["losses"] == pytest.approx(m_single["losses"], rel=1e-5)


def boot_seconds() -> float:
    """Wall time this machine takes to start a Python process that imports torch.distributed and minilora."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch.distributed, minilora"], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    return time.monotonic() - t0


@linux_only
def test_hung_rank_times_out_with_a_clear_error(base_dir, tmp_path):
    """A rank that stops answering (SIGSTOP) is not a dead process torchrun can see: the others give up
    after MINILORA_DIST_TIMEOUT seconds and say why. The timeout also bounds the ranks' start-up meeting,
    so it is scaled to this machine: 5 s, or three times a measured start-up if that is longer."""
    boot = boot_seconds()
    timeout = max(5, math.ceil(3 * boot))
    slack = max(30.0, 10 * boot)  # rank 0 notices the timeout, reports and exits
    out = tmp_path / "run"
    p = torchrun("-m", "minilora", "finetune", "--base", str(base_dir), "--out", str(out), "--steps", str(STEPS),
                 *CLI, env={D.TIMEOUT_ENV: str(timeout)})
    pids = ranks(p)
    wait_for_checkpoint(p, out)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while alive(pids[0]) and time.monotonic() - t0 < timeout + slack + GUARD:
            time.sleep(0.05)
        waited = time.monotonic() - t0
    finally:
        os.kill(pids[1], signal.SIGKILL)  # torchrun's SIGTERM cannot reach a stopped process
    log = finish(p)
    assert 0.9 * timeout < waited < timeout + slack, f"rank 0 stopped after {waited:.1f} s with a {timeout} s timeout"
    assert p.returncode != 0
    assert "rank 0 of 2" in log and f"has not answered within {timeout:g} s (${D.TIMEOUT_ENV})" in log, log
    assert "rerun with --resume" in log
    read_state(find_checkpoint(out))
