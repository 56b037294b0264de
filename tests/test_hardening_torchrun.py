"""torchrun's exit and the run directory under several ranks, tried through the command line, 2 gloo ranks.

- A finished DDP or FSDP run exits 0, run after run, each into a new --out: the process group and every
  thread are shut down before the interpreter ends (no `terminate called without an active exception`).
- Only rank 0 creates, checks and locks the run directory; the other ranks wait for its verdict, so a refusal
  is one `error:` line from one rank, and no rank reads a half-made directory.

MINILORA_TORCHRUN_REPEAT sets how many runs of each kind (default 3; the fix was measured with 20 on a busy
machine). Each run is a few seconds of a 2-block GPT on 2 cores; the waits are failure guards of minutes.
"""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from minilora import GPT, ByteTokenizer, GPTConfig

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with gloo")

REPEAT = int(os.environ.get("MINILORA_TORCHRUN_REPEAT", "3"))
GUARD = 600  # seconds: only a stuck run takes this long
ARGS = ["--steps", "3", "--n-train", "16", "--n-val", "4", "--batch-size", "4", "--lora-r", "2", "--no-progress"]
KINDS = {"ddp": [], "fsdp": ["--fsdp", "--mode", "qlora", "--gradient-checkpointing"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(1234)
    GPT(GPTConfig(block_size=192, vocab_size=257, n_layer=2, n_head=2, n_embd=16, dropout=0.0)).save_pretrained(d)
    ByteTokenizer().save(d)
    return d


def torchrun(*args: str) -> tuple[int, str]:
    """(exit status, stdout + stderr) of `torchrun --nproc_per_node 2 -m minilora ARGS`, one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "0", "-m", "minilora", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=GUARD)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    return p.returncode, out


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_finished_run_exits_0_run_after_run(base, tmp_path, kind):
    for i in range(REPEAT):
        rc, log = torchrun("finetune", "--base", str(base), "--out", str(tmp_path / f"run{i}"), *ARGS, *KINDS[kind])
        assert rc == 0 and "terminate called" not in log, f"{kind} run {i + 1} of {REPEAT}:\n{log}"
        assert log.count("exact match") == 1, log  # rank 0 alone reports
        assert (tmp_path / f"run{i}" / "metrics.json").is_file()


def test_a_refused_run_directory_is_one_line_from_one_rank(base, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "minilora_run.json").write_text("not minilora's\n")
    rc, log = torchrun("finetune", "--base", str(base), "--out", str(out), *ARGS)
    assert rc != 0 and "terminate called" not in log, log
    assert len(error_lines(log)) == 1 and "minilora_run.json" in error_lines(log)[0], log
    assert not re.search(r'File ".*/minilora/', log), log  # no rank shows a traceback (torchrun shows its own)
    assert (out / "minilora_run.json").read_text() == "not minilora's\n"


def test_bad_targets_are_refused_by_one_rank_before_the_run_directory_exists(base, tmp_path):
    out = tmp_path / "new"
    rc, log = torchrun("finetune", "--base", str(base), "--out", str(out), *ARGS, "--targets", "no_such_layer")
    assert rc != 0 and "terminate called" not in log, log
    assert len(error_lines(log)) == 1 and "no_such_layer" in error_lines(log)[0], log
    assert not re.search(r'File ".*/minilora/', log), log
    assert not out.exists()
