"""What minilora writes and deletes, tried against a full disk and a user's files.

- A full disk: a checkpoint save cut short at its k-th write (a short write, then ENOSPC), for every k, keeps
  a complete checkpoint at every instant (checked before every write, rename and removal) that resumes to
  the weights it holds; the save itself ends in OSError(ENOSPC), never in a truncated file.
- ENOSPC during a command ends in one `error:` line.
- --overwrite never deletes or replaces a file minilora cannot show it wrote (a user's checkpoint/, adapter/,
  metrics.json, a pretrain's config.json / model.safetensors, a file named like a dead process's temporary).
- An unfinished run's checkpoint is never discarded without --overwrite: rerunning without --resume is
  refused naming --resume and --overwrite.
- Ctrl-C names the checkpoint that is kept and --resume.
- Atomically written files get the mode the umask gives (0644 under umask 022), not 0600.
- A truncated or random-bytes .safetensors (model, adapter) is one `error:` line naming the file; an adapter
  holding NaN is refused and leaves the model as it was.
"""
import errno
import hashlib
import importlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora import GPT, ByteTokenizer, GPTConfig, add_lora, save_adapter


def _module(*names: str):
    """The first of these module names that imports (the checkpoint code lives in the run-directory package)."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(names)


ts = _module("minilora.runs.train_state", "minilora.train_state")
CONFIG = GPTConfig(block_size=192, vocab_size=257, n_layer=1, n_head=2, n_embd=16, dropout=0.0)


# ----- a full disk -----

def lora_model() -> GPT:
    torch.manual_seed(0)
    return add_lora(GPT(CONFIG), ["c_attn"], r=2, alpha=4)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(CONFIG.vocab_size, (2, 16), generator=g)
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad()


def save(out: Path, model, opt, n: int) -> None:
    ts.save_train_state(out, model=model, optimizer=opt, generator=torch.Generator().manual_seed(n), step=n,
                        run={"r": 2}, identity={"x": 1}, history=dict(losses=[0.5] * n, evals=[], tokens=n, seconds=0.0))


class FullDisk:
    """os.write that writes half of its k-th call's bytes (a short write) and raises ENOSPC from then on;
    before every write, rename and removal it checks that `out` holds a complete checkpoint."""

    def __init__(self, k: int, out: Path, monkeypatch):
        self.k, self.out, self.calls, self.full, self.checks = k, out, 0, False, 0
        self.real = {name: getattr(os, name) for name in ("write", "replace", "rename", "unlink", "rmdir")}
        self.real_rmtree = shutil.rmtree
        monkeypatch.setattr(os, "write", self.write)
        for name in ("replace", "rename", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, self.checked(self.real[name]))
        monkeypatch.setattr(shutil, "rmtree", self.checked(self.real_rmtree))

    def complete(self) -> int:
        """Step of the checkpoint `out` holds now (read_state verifies every file's sha256)."""
        self.checks += 1
        return ts.read_state(ts.find_checkpoint(self.out))["step"]

    def checked(self, f):
        def call(*a, **kw):
            self.complete()
            return f(*a, **kw)
        return call

    def write(self, fd, data):
        self.complete()
        self.calls += 1
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.calls == self.k:
            self.full = True
            half = bytes(data)[:len(data) // 2]
            if not half:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.real["write"](fd, half)
        return self.real["write"](fd, data)


def test_a_save_cut_short_at_any_write_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    model = lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, opt, 1)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    save(pristine, model, opt, 1)
    weights = {1: trainable(model)}
    step(model, opt, 2)
    weights[2] = trainable(model)
    k = 0
    while True:
        k += 1
        out = tmp_path / f"k{k}"
        shutil.copytree(pristine, out)
        with monkeypatch.context() as m:
            disk = FullDisk(k, out, m)
            try:
                save(out, model, opt, 2)
                error = None
            except OSError as e:
                error = e
        fired = disk.calls >= k
        assert disk.checks > 0
        if fired:
            assert error is not None and error.errno == errno.ENOSPC, f"write {k} of the save was cut short, yet it returned"
        saved = ts.read_state(ts.find_checkpoint(out))["step"]
        assert saved == (1 if fired else 2)
        twin = lora_model()
        opt2 = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
        ts.load_train_state(out, model=twin, optimizer=opt2, generator=torch.Generator(), run={"r": 2},
                            identity={"x": 1})
        assert all(torch.equal(trainable(twin)[n], w) for n, w in weights[saved].items())
        if not fired:
            break
    assert k > 1  # at least one write was cut short


def test_a_full_disk_during_finetune_is_one_error_line(tmp_path):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("finds the written file through /proc/self/fd")
    base = tmp_path / "base"
    torch.manual_seed(0)
    GPT(CONFIG).save_pretrained(base)
    ByteTokenizer().save(base)
    out = tmp_path / "run"
    # every os.write into the run directory fails with ENOSPC, except its marker's
    script = (f"import errno, os, sys\n"
              f"real = os.write\n"
              f"def write(fd, data):\n"
              f"    path = os.readlink(f'/proc/self/fd/{{fd}}')\n"
              f"    if path.startswith({str(out)!r}) and 'minilora_run.json' not in path:\n"
              f"        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
              f"    return real(fd, data)\n"
              f"os.write = write\n"
              f"from minilora.__main__ import main\n"
              f"sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", script, "finetune", "--base", str(base), "--out", str(out),
                        *FINETUNE, "--steps", "2", "--save-every", "1"], capture_output=True, text=True, timeout=600)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "space" in lines[0].lower(), lines[0]


# ----- what --overwrite may touch -----

FINETUNE = ["--n-train", "8", "--n-val", "2", "--batch-size", "2", "--lora-r", "2", "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    GPT(CONFIG).save_pretrained(d)
    ByteTokenizer().save(d)
    return d


def cli(capsys, *args: str) -> tuple[int, str]:
    from minilora.__main__ import main
    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def files(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in d.rglob("*") if f.is_file()}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def users_files(kind: str) -> list[dict[str, bytes]]:
    tmp = f"notes.txt.tmp-{dead_pid()}-0123abcd"
    if kind == "pretrain":
        return [{"config.json": b'{"model_type": "gpt2"}\n'}, {"model.safetensors": b"their weights"}]
    return [{"checkpoint/notes.txt": b"mine"}, {"checkpoint/state.json": b"{}"},
            {"adapter/adapter_config.json": b"{}", "adapter/README": b"mine"}, {"metrics.json": b"[1, 2]"},
            {tmp: b"mine"}]


@pytest.mark.parametrize("kind,case", [("finetune", i) for i in range(5)] + [("pretrain", i) for i in range(2)])
def test_overwrite_leaves_the_users_files_alone(base, tmp_path, capsys, kind, case):
    out = tmp_path / "out"
    theirs = users_files(kind)[case]
    for name, data in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = files(out)
    if kind == "pretrain":
        rc, err = cli(capsys, "pretrain", "--out", str(out), "--steps", "1", "--batch-size", "2", "--n-layer", "1",
                      "--n-embd", "16", "--n-head", "2", "--block-size", "32", "--vocab-size", "260",
                      "--no-progress", "--overwrite")
    else:
        rc, err = cli(capsys, "finetune", "--base", str(base), "--out", str(out), "--steps", "1", *FINETUNE, "--overwrite")
    after = files(out)
    assert {n: after.get(n) for n in before} == before, f"--overwrite changed the user's files (exit {rc}):\n{err}"
    if rc != 0:  # refused: one line naming what is in the way
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert any(Path(n).parts[0] in lines[0] for n in theirs), lines[0]


def test_an_unfinished_run_is_not_discarded_without_resume_or_overwrite(base, tmp_path, monkeypatch, capsys):
    from minilora.__main__ import main
    out = tmp_path / "run"
    args = ["finetune", "--base", str(base), "--out", str(out), "--steps", "4", "--save-every", "2", *FINETUNE]
    real_step, calls = torch.optim.AdamW.step, []

    def interrupted(self, *a, **kw):  # Ctrl-C during step 3, after the checkpoint of step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)
    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", interrupted)
        assert main(args) == 130
    state = (out / "checkpoint" / "state.json").read_bytes()
    interrupted = capsys.readouterr().err  # Ctrl-C says what is kept and how to go on
    assert "checkpoint at step 2" in interrupted and "--resume" in interrupted, interrupted
    for again in (args, [*args[:-len(FINETUNE)], *FINETUNE, "--lr", "0.5"]):  # the same settings, other ones
        assert main(again) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0], err
        assert (out / "checkpoint" / "state.json").read_bytes() == state
    assert main([*args, "--resume"]) == 0


# ----- file modes -----

def test_atomically_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_adapter(lora_model(), tmp_path / "adapter")
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "adapter").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


# ----- damaged files are one error line -----

@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
@pytest.mark.parametrize("which", ["model", "adapter"])
def test_a_damaged_safetensors_file_is_one_error_line(base, tmp_path, capsys, damage, which):
    from minilora.__main__ import main
    model = tmp_path / "model"
    shutil.copytree(base, model)
    adapter = tmp_path / "adapter"
    save_adapter(add_lora(GPT.from_pretrained(base), ["c_attn"], r=2, alpha=4), adapter)
    f = model / "model.safetensors" if which == "model" else adapter / "adapter_model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:len(raw) // 2] if damage == "truncated" else os.urandom(len(raw)))
    capsys.readouterr()
    rc = main(["generate", "--model", str(model), "--adapter", str(adapter), "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and f.name in err[0], err


def test_an_adapter_with_a_nan_weight_is_refused(base, tmp_path):
    from minilora import load_adapter
    model = add_lora(GPT.from_pretrained(base), ["c_attn"], r=2, alpha=4)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.lora_B.fill_(math.nan)
    save_adapter(model, tmp_path / "adapter")
    fresh = GPT.from_pretrained(base)
    before = {n: t.clone() for n, t in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="inf or NaN"):
        load_adapter(fresh, tmp_path / "adapter")
    assert fresh.state_dict().keys() == before.keys()
    assert all(torch.equal(fresh.state_dict()[n], t) for n, t in before.items())
