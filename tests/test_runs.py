"""Run directories: a user's files are never lost, a bad directory is refused before any work, a run holds a
lock that a second run (a real second process) is refused by, and a dead holder's lock is taken over."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minilora.demos.finetune as demo
from minilora import GPT, GPTConfig
from minilora.data import TokenStream
from minilora.runs import LOCK, MARKER, RunDir, RunDirError, RunLockedError, remove_dead_temps, temp_name
from minilora.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog, again and again, {i} times." for i in range(40)]
TINY = dict(vocab_size=300, n_layer=1, n_head=2, n_embd=16, block_size=16, pretrain_steps=2, pretrain_batch_size=2,
            progress=False)


@pytest.fixture
def small_corpus(monkeypatch):
    """pretrain_base on 40 short documents instead of the stdlib's English (seconds, not minutes)."""
    monkeypatch.setattr(demo, "english_documents", lambda: list(DOCS))


@pytest.fixture
def no_work(monkeypatch):
    """Any pretraining or training that starts raises: a refusal must come before it."""
    def started(*a, **k):
        raise AssertionError("work started before the run directory was checked")
    monkeypatch.setattr(demo, "english_documents", started)
    monkeypatch.setattr("minilora.train.prepare_model", started)


def user_files(d: Path) -> dict[str, bytes]:
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("my notes")
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return {"notes.txt": b"my notes", "sub/data.bin": b"\x00\x01"}


def assert_intact(d: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        assert (d / name).read_bytes() == content, name


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))


STREAM = TokenStream(list(range(16)) * 4, 8)


# ----- refused before any work, nothing deleted -----

def test_pretrain_into_a_users_directory_is_refused_before_any_work(tmp_path, no_work):
    files = user_files(tmp_path / "mine")
    with pytest.raises(RunDirError, match="not empty.*--overwrite"):
        demo.pretrain_base(demo.DemoConfig(**TINY), tmp_path / "mine")
    assert_intact(tmp_path / "mine", files)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt", "sub"]  # not even a lock file


def test_dotdot_and_dot_are_resolved_and_refused_up_front(tmp_path, no_work, monkeypatch):
    files = user_files(tmp_path / "a")
    (tmp_path / "a" / "b").mkdir()
    with pytest.raises(RunDirError, match="not empty"):  # a/b/.. is a, which holds the user's files
        demo.pretrain_base(demo.DemoConfig(**TINY), tmp_path / "a" / "b" / "..")
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(RunDirError, match="not empty"):
        demo.pretrain_base(demo.DemoConfig(**TINY), ".")
    with pytest.raises(RunDirError, match="not empty"):
        train(tiny_gpt(), TrainConfig(mode="full", steps=1, batch_size=2, progress=False, out_dir="."), STREAM)
    assert_intact(tmp_path / "a", files)
    (tmp_path / "f").write_text("x")
    for bad in (tmp_path / "f", "/dev/null", tmp_path / "f" / "below"):
        with pytest.raises(RunDirError):
            demo.pretrain_base(demo.DemoConfig(**TINY), bad)
    with pytest.raises(RunDirError, match="empty path"):
        RunDir("", "pretrain")


def test_pretrain_into_dot_works_when_it_is_empty_and_again_as_the_same_run(tmp_path, small_corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = demo.pretrain_base(demo.DemoConfig(**TINY), ".")
    assert len(res.losses) == 2
    assert json.loads((tmp_path / MARKER).read_text())["kind"] == "pretrain"
    assert GPT.from_pretrained(tmp_path).config.n_embd == 16
    first = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "added.txt").write_text("the user's, added later")  # a file the run did not create
    demo.pretrain_base(demo.DemoConfig(**{**TINY, "seed": 1}), ".")  # the same kind: results replaced
    assert (tmp_path / "added.txt").read_text() == "the user's, added later"
    assert (tmp_path / "model.safetensors").read_bytes() != first
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporaries left


def test_overwrite_writes_beside_the_users_files_and_deletes_none(tmp_path, small_corpus):
    files = user_files(tmp_path)
    demo.pretrain_base(demo.DemoConfig(**TINY), tmp_path, overwrite=True)
    assert_intact(tmp_path, files)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "pretrain.json").is_file()
    out = tmp_path / "ft"
    files = user_files(out)
    cfg = dict(mode="full", steps=2, batch_size=2, progress=False, out_dir=str(out))
    with pytest.raises(RunDirError, match="not empty"):
        train(tiny_gpt(), TrainConfig(**cfg), STREAM)
    train(tiny_gpt(), TrainConfig(**cfg, overwrite=True), STREAM)
    assert_intact(out, files)
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 2
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoint" / "state.json").is_file()


def test_a_run_of_another_kind_is_refused(tmp_path, no_work):
    RunDir(tmp_path / "ft", "finetune").close()
    (tmp_path / "ft" / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError, match="minilora finetune run, not a pretrain run"):
        demo.pretrain_base(demo.DemoConfig(**TINY), tmp_path / "ft")
    with pytest.raises(RunDirError, match="not a demo run"):
        demo.run_demo(demo.DemoConfig(**TINY, out=str(tmp_path / "ft")))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / MARKER).write_text('{"kind": "mine"}')  # a file of that name that is not minilora's
    with pytest.raises(RunDirError, match="not minilora's"):
        RunDir(tmp_path / "foreign", "pretrain", overwrite=True)


# ----- the lock, with real processes -----

HOLD = """
import sys, time
from minilora.runs import RunDir
d = RunDir(sys.argv[1], "finetune")
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills this process)
"""


def holder(path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    p = holder(out)
    try:
        with pytest.raises(RunLockedError, match=f"in use by another minilora run \\(pid {p.pid}\\)"):
            RunDir(out, "finetune")
        with pytest.raises(RunLockedError, match=f"pid {p.pid}"):  # the trainer asks for the same lock
            train(tiny_gpt(), TrainConfig(mode="full", steps=1, batch_size=2, progress=False, out_dir=str(out)),
                  STREAM)
        assert not (out / "checkpoint").exists()
    finally:
        p.kill()
        p.wait()
    with RunDir(out, "finetune") as d:  # the lock of a process killed with SIGKILL: taken over
        assert d.locked and (out / LOCK).read_text().strip() == str(os.getpid())
    p = holder(out)  # and released at close, for the next process
    p.stdin.close()
    p.wait()


def test_stale_temp_cleanup_removes_only_temporaries_of_dead_processes(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = holder(tmp_path / "other")  # a live process that is not this one
    try:
        names = {"dead": f".minilora-checkpoint.tmp-{dead.pid}-abcd0123",
                 "live": f".minilora-checkpoint.tmp-{live.pid}-abcd0123", "mine": temp_name("checkpoint"),
                 "user": "checkpoint.tmp-notes", "user's, named like one": f"checkpoint.tmp-{dead.pid}-abcd0123"}
        for n in names.values():
            (tmp_path / n).mkdir()
            (tmp_path / n / "f").write_text("x")
        assert [p.name for p in remove_dead_temps(tmp_path)] == [names["dead"]]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["other", *[n for k, n in names.items() if k != "dead"]])
    finally:
        live.kill()
        live.wait()


TRAIN = """
import sys, time, torch
from pathlib import Path
from minilora import GPT, GPTConfig
from minilora.data import TokenStream
from minilora.train import TrainConfig, train
out, steps, gate = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
def wait_at_step_2(step, loss):  # the first run pauses here, checkpoint written, until the test opens the gate
    while step == 2 and not gate.exists():
        time.sleep(0.01)
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
cfg = TrainConfig(mode="full", steps=steps, batch_size=2, save_every=1, progress=False, out_dir=out)
train(model, cfg, TokenStream(list(range(16)) * 4, 8), callback=wait_at_step_2)
"""


def test_two_processes_training_into_one_directory(tmp_path):
    """The issue's failure: two finetune runs into one --out, and one died because the other's cleanup deleted
    its live temporary directory. Now the second is refused at once, naming the first's pid, and the first
    finishes, its checkpoints intact."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out, gate = tmp_path / "run", tmp_path / "gate"
    first = subprocess.Popen([sys.executable, "-c", TRAIN, str(out), "6", str(gate)], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "checkpoint" / "state.json").exists():  # no time limit: a slow machine only waits longer
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-c", TRAIN, str(out), "3", str(gate)], env=env,
                                capture_output=True, text=True)
        assert second.returncode != 0, second.stderr[-2000:]
        assert f"in use by another minilora run (pid {first.pid})" in second.stderr, second.stderr[-2000:]
        gate.touch()
        _, err = first.communicate()
        assert first.returncode == 0, err[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 6
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 6
