"""Fault injection into checkpoint saves: at every instant at least one complete checkpoint is reachable.

The save of step 4 (the previous checkpoint is step 2) is run once to count its filesystem calls (mkdir, write,
fsync, replace, rename, unlink, rmdir, rmtree, safetensors' save_file). Then, for each call k in turn, the
process "dies" at call k: that call and every later one raises (so not even the save's own cleanup runs, as
under kill -9; a dying save_file leaves half a file). Each time --resume must find a complete checkpoint,
step 2 or step 4 with exactly that step's weights, and continue to the uninterrupted run's weights. The
issue's double crash (a save cut off between its two renames, then the next save cut off too) is run the
same way for every call of the second save.
"""
import os
import shutil

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from minilora import GPT, GPTConfig
from minilora.runs import train_state
from minilora.data import TokenStream
from minilora.train import TrainConfig, train
from minilora.runs.train_state import find_checkpoint, read_state

CALLS = [(os, "replace"), (os, "rename"), (os, "mkdir"), (os, "unlink"), (os, "rmdir"), (os, "fsync"), (os, "write"),
         (shutil, "rmtree"), (safetensors.torch, "save_file")]
DATA = TokenStream(list(range(16)) * 4, 8)


class Killed(BaseException):
    """The process dies here (a BaseException: no `except Exception` or ignore_errors swallows it)."""


def base() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))


def cfg(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(mode="lora", r=2, alpha=4, lr=1e-2, steps=4, batch_size=2, save_every=2,
                                 progress=False, out_dir=str(out)), **kw})


class Injector:
    """Counts the filesystem calls of the save of step `at`; from call number `kill` on, each one raises."""

    def __init__(self, monkeypatch, at: int, kill: int | None = None):
        self.at, self.kill, self.calls, self.armed, self.log = at, kill, 0, False, []
        for module, name in CALLS:
            monkeypatch.setattr(module, name, self.wrap(getattr(module, name), name))
        real_save = train_state.save_train_state

        def save(*a, **kw):
            self.armed = kw["step"] == self.at
            try:
                return real_save(*a, **kw)
            finally:
                self.armed = False
        monkeypatch.setattr(train_state, "save_train_state", save)

    def wrap(self, real, name):
        def call(*a, **kw):
            if not self.armed:
                return real(*a, **kw)
            self.calls += 1
            self.log.append(name)
            if self.kill is not None and self.calls >= self.kill:
                if name == "save_file" and self.calls == self.kill:  # dies halfway through writing the file
                    real(*a, **kw)
                    with open(a[1], "r+b") as f:
                        f.truncate(os.path.getsize(a[1]) // 2)
                raise Killed(f"killed at call {self.calls} ({name})")
            return real(*a, **kw)
        return call


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its adapter weights after step 2 and step 4."""
    weights = {}

    def keep(step, loss):
        weights[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model = base()
    train(model, cfg(tmp_path_factory.mktemp("ref")), DATA, callback=keep)  # prepare_model works in place
    return weights


def check_recovers(out, reference, monkeypatch):
    """A complete checkpoint of step 2 or 4, with that step's exact weights; resume reaches step 4's weights."""
    monkeypatch.undo()
    path = find_checkpoint(out)
    step = read_state(path)["step"]
    assert step in (2, 4)
    saved = load_file(str(path / "trainable.safetensors"))
    assert saved.keys() == reference[step].keys()
    assert all(torch.equal(saved[n], reference[step][n]) for n in saved)
    res = train(base(), cfg(out), DATA, resume=True)
    trained = {n: p for n, p in res.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(trained[n], reference[4][n]) for n in trained)
    return step


def count_calls(tmp_path, monkeypatch, at: int, **kw) -> list[str]:
    counter = Injector(monkeypatch, at=at)
    train(base(), cfg(tmp_path / "count"), DATA, **kw)
    monkeypatch.undo()
    return counter.log


def test_a_kill_at_any_filesystem_call_of_a_save_leaves_a_checkpoint_to_resume(tmp_path, monkeypatch, reference):
    calls = count_calls(tmp_path, monkeypatch, at=4)
    assert {"save_file", "fsync", "replace", "mkdir", "unlink", "rmdir"} <= set(calls) and len(calls) >= 15, calls
    found = []
    for k in range(1, len(calls) + 1):
        out = tmp_path / f"kill{k}"
        Injector(monkeypatch, at=4, kill=k)
        with pytest.raises(Killed):
            train(base(), cfg(out), DATA)
        found.append(check_recovers(out, reference, monkeypatch))
    assert found[0] == 2 and found[-1] == 4  # both outcomes occur: the faults did land inside the save


def test_the_double_crash_window_is_closed(tmp_path, monkeypatch, reference):
    """First crash: between the two renames (only checkpoint.old is complete). Second crash: at each call of
    the next save, which must not remove checkpoint.old before its successor is in place."""
    def first_crash(out):
        real, moved = os.replace, []

        def replace(src, dst):
            if f"checkpoint.tmp-{os.getpid()}-" in str(src):  # moving a new checkpoint into place
                moved.append(src)
                if len(moved) == 2:  # the save of step 4: checkpoint (step 2) is already checkpoint.old
                    raise Killed("between the renames")
            return real(src, dst)
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            train(base(), cfg(out), DATA)
        monkeypatch.undo()
        assert not (out / "checkpoint").exists() and find_checkpoint(out).name == "checkpoint.old"

    probe = tmp_path / "probe"
    first_crash(probe)
    shutil.copytree(probe, tmp_path / "count")  # count the calls of the second save on a copy
    counter = Injector(monkeypatch, at=4)
    train(base(), cfg(tmp_path / "count"), DATA, resume=True)
    monkeypatch.undo()
    calls = counter.log
    assert "replace" in calls and len(calls) >= 10, calls
    for k in range(1, len(calls) + 1):
        out = tmp_path / f"double{k}"
        shutil.copytree(probe, out)
        Injector(monkeypatch, at=4, kill=k)
        with pytest.raises(Killed):
            train(base(), cfg(out), DATA, resume=True)
        check_recovers(out, reference, monkeypatch)
