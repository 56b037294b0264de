"""The trainer end to end at tiny sizes: full / LoRA / QLoRA learn, resume is bit-exact, checkpoints are safe."""
import json
import math
import os

import pytest
import torch

from minilora import GPT, GPTConfig
from minilora.data import BPETokenizer, InstructionSet, TokenStream, prompt, yoda_dataset
from minilora.evaluate import evaluate, greedy_matches
from minilora.generate import respond
from minilora.train import TrainConfig, lr_at, train
from minilora.runs import train_state
from minilora.runs.train_state import CheckpointError, find_checkpoint


@pytest.fixture(scope="module")
def setup():
    """A tokenizer and a tiny base GPT pretrained on plain sentences, and 8 Yoda examples to learn."""
    torch.manual_seed(0)
    pool, _ = yoda_dataset(400, 1, seed=1)
    tok = BPETokenizer.train("\n".join(prompt(e.instruction, e.context) + e.output for e in pool), 400)
    plain = TokenStream(tok.encode(" ".join(e.context for e in pool[8:])), 32)
    base = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32))
    base = train(base, TrainConfig(mode="full", lr=1e-2, steps=60, batch_size=16, progress=False), plain).model
    return tok, base.config, {k: v.clone() for k, v in base.state_dict().items()}, InstructionSet(pool[:8], tok, 64)


def fresh(setup) -> GPT:
    _, config, sd, _ = setup
    model = GPT(GPTConfig(**{**config.__dict__}))
    model.load_state_dict(sd)
    return model


def tiny(**kw) -> TrainConfig:
    base = dict(mode="lora", r=4, alpha=8, lr=1e-2, steps=40, batch_size=8, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(setup):
    return train(fresh(setup), tiny(mode="full", steps=80, eval_every=40), setup[3], setup[3])


def test_full_finetune_loss_falls_and_exact_match_rises(setup, full_run):
    tok, _, _, data = setup
    before = evaluate(fresh(setup), data)
    res = full_run
    after = res.final
    assert before["exact_match"] == 0.0
    assert after["loss"] < before["loss"] - 2.0
    assert after["exact_match"] >= 0.5
    assert res.params.trainable == res.params.total
    assert sum(res.losses[-5:]) < sum(res.losses[:5]) / 3
    assert [e["step"] for e in res.evals] == [40, 80]


def test_greedy_match_metric_equals_real_greedy_generation(setup, full_run):
    """exact_match decides in one forward pass what token-by-token greedy decoding would produce."""
    tok, _, _, data = setup
    model = full_run.model
    x, y = data.collate(list(range(len(data))))
    with torch.no_grad():
        predicted = greedy_matches(model.eval()(x), y).tolist()
    generated = [respond(model, tok, e.instruction, e.context) == e.output for e in data.examples]
    assert predicted == generated
    assert 0 < sum(generated) < len(generated)  # both outcomes occur, so the comparison means something


def test_lora_trains_only_the_adapters(setup, tmp_path):
    from minilora import load_adapter
    tok, _, sd, data = setup
    before = evaluate(fresh(setup), data)
    res = train(fresh(setup), tiny(lr=3e-2, steps=40, out_dir=str(tmp_path)), data, data)
    assert res.final["loss"] < before["loss"] - 1.0
    # 2 layers x (c_attn 32->96, attn.c_proj 32->32, c_fc 32->128, mlp.c_proj 128->32), r = 4
    assert res.params.trainable == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    frozen = {k: v for k, v in res.model.state_dict().items() if "lora_" not in k}
    for k, v in frozen.items():  # every base weight is bit-identical to the base model's
        assert torch.equal(v, sd[k.replace(".base_layer", "")]), k
    # the adapter is in PEFT's layout and reproduces the fine-tuned model on a fresh base
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    reloaded = load_adapter(fresh(setup), tmp_path / "adapter")
    assert evaluate(reloaded, data)["loss"] == pytest.approx(res.final["loss"], abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["losses"] == res.losses


def test_qlora_trains_adapters_on_an_nf4_base(setup):
    _, _, _, data = setup
    before = evaluate(fresh(setup), data)
    res = train(fresh(setup), tiny(mode="qlora", lr=3e-2, steps=40), data, data, measure_memory=True)
    assert res.final["loss"] < before["loss"] - 1.0
    kinds = {type(m).__name__ for m in res.model.modules()}
    assert "QLoRALinear" in kinds
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in res.model.named_parameters() if p.requires_grad)
    assert res.memory.quantized_weights > 0 and res.memory.gradients == 0


def test_grad_accumulation_equals_one_big_batch(setup):
    _, _, _, data = setup
    """Same examples per step, split in two micro-batches of different target-token counts: the token-weighted
    accumulated gradient is the big batch's, so every later loss (which depends on the updates) agrees."""
    one = train(fresh(setup), tiny(mode="full", steps=4, batch_size=8), data)
    two = train(fresh(setup), tiny(mode="full", steps=4, batch_size=4, grad_accum=2), data)
    assert one.losses == pytest.approx(two.losses, abs=1e-5)
    assert one.losses[-1] < one.losses[0]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_after_a_crash_reaches_the_same_loss_bit_for_bit(setup, tmp_path, mode):
    _, _, _, data = setup
    cfg = dict(mode=mode, steps=8, save_every=3, dropout=0.1 if mode == "lora" else 0.0, eval_every=4)
    whole = train(fresh(setup), tiny(**cfg, out_dir=str(tmp_path / "a")), data, data)

    class Crash(Exception):
        pass

    def crash(step, loss):
        if step == 5:
            raise Crash
    with pytest.raises(Crash):
        train(fresh(setup), tiny(**cfg, out_dir=str(tmp_path / "b")), data, data, callback=crash)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    resumed = train(fresh(setup), tiny(**cfg, out_dir=str(tmp_path / "b")), data, data, resume=True)
    assert resumed.losses == whole.losses  # exactly, not approximately
    assert resumed.evals == whole.evals
    for (n, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n


def test_corrupt_or_mismatched_checkpoint_is_refused(setup, tmp_path):
    _, _, _, data = setup
    out = str(tmp_path)
    train(fresh(setup), tiny(steps=2, out_dir=out), data)
    with pytest.raises(CheckpointError, match="lr=0.01"):  # another learning rate: another run
        train(fresh(setup), tiny(steps=2, lr=0.02, out_dir=out), data, resume=True)
    other = fresh(setup)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.add_(1e-3)
    with pytest.raises(CheckpointError, match="frozen base"):
        train(other, tiny(steps=2, out_dir=out), data, resume=True)
    f = tmp_path / "checkpoint" / "trainable.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="trainable.safetensors is corrupt"):
        train(fresh(setup), tiny(steps=2, out_dir=out), data, resume=True)
    (tmp_path / "checkpoint" / "state.json").write_text('{"format": "minilora-train-st')
    with pytest.raises(CheckpointError, match="unreadable"):
        train(fresh(setup), tiny(steps=2, out_dir=out), data, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(fresh(setup), tiny(steps=2, out_dir=str(tmp_path / "empty")), data, resume=True)


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(setup, tmp_path, monkeypatch):
    import safetensors.torch
    _, _, _, data = setup
    out = str(tmp_path)
    res = train(fresh(setup), tiny(steps=2, out_dir=out), data)
    good = (tmp_path / "checkpoint" / "state.json").read_text()
    real_save = safetensors.torch.save_file
    calls = []

    def dies_halfway(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second file: write half of it, then the process "dies"
            real_save(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise KeyboardInterrupt
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(setup), tiny(steps=4, out_dir=out), data)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint" / "state.json").read_text() == good
    assert not list(tmp_path.glob("checkpoint.tmp-*"))
    again = train(fresh(setup), tiny(steps=2, out_dir=out), data, resume=True)  # still loads, already done
    assert again.losses == res.losses

    # dying between the two renames (old moved aside, new not yet in place): checkpoint.old is used
    real_replace = os.replace

    def replace_dies_on_second(src, dst):
        if f".tmp-{os.getpid()}-" in str(src):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(train_state.os, "replace", replace_dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(setup), tiny(steps=4, out_dir=out), data)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint").exists()
    assert find_checkpoint(tmp_path).name == "checkpoint.old"
    again = train(fresh(setup), tiny(steps=2, out_dir=out), data, resume=True)
    assert again.losses == res.losses


def test_gradient_checkpointing_and_paged_adamw_follow_the_same_trajectory(setup):
    _, _, _, data = setup
    plain = train(fresh(setup), tiny(steps=3), data)
    ckpt = train(fresh(setup), tiny(steps=3, gradient_checkpointing=True), data)
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-6)
    paged = train(fresh(setup), tiny(steps=3, paged=True, page_size=1024, device_budget=2048), data)
    assert paged.losses == pytest.approx(plain.losses, abs=1e-5)


def test_learning_rate_schedule_and_config_errors():
    cfg = TrainConfig(lr=1.0, steps=11, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, cfg) == pytest.approx(1.0) and lr_at(10, cfg) == pytest.approx(0.1)
    assert lr_at(6, cfg) == pytest.approx(0.55)
    for bad, match in [(dict(mode="prefix"), "mode"), (dict(r=0), "r"), (dict(steps=-1), "steps"),
                       (dict(save_every=5), "out_dir"), (dict(dropout=1.0), "dropout"),
                       (dict(compute_dtype="int8"), "compute_dtype")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="out_dir"):
        train(GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8)), TrainConfig(),
              TokenStream(list(range(10)) * 3, 8), resume=True)


def test_loss_curve_plot_smooths_and_checks_its_input():
    from minilora.plots.training import plot_loss_curves, smooth
    assert smooth([4.0, 2.0, 0.0, 2.0], 2) == [4.0, 3.0, 1.0, 1.0]
    fig = plot_loss_curves({"lora": [3.0, 2.0, 1.0]}, {"lora": [{"step": 3, "loss": 1.1}]}, smoothing=2)
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="at least one run"):
        plot_loss_curves({})
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], 0)


# ----- what a resume checks (issue 13, item 8) -----

def test_resume_refuses_other_data_model_or_tokenizer_naming_it(setup, tmp_path):
    tok, config, _, data = setup
    out = str(tmp_path)
    train(fresh(setup), tiny(steps=2, out_dir=out), data, data)
    fewer = InstructionSet(data.examples[:7], tok, 64)  # another --data / --n-train
    with pytest.raises(CheckpointError, match="other training data"):
        train(fresh(setup), tiny(steps=2, out_dir=out), fewer, data, resume=True)
    with pytest.raises(CheckpointError, match="other validation data"):
        train(fresh(setup), tiny(steps=2, out_dir=out), data, fewer, resume=True)
    other_tok = BPETokenizer.train(" ".join(e.context for e in data.examples), 300)
    with pytest.raises(CheckpointError, match="tokenizer.vocab_size=400, this run has tokenizer.vocab_size=300"):
        train(fresh(setup), tiny(steps=2, out_dir=out), InstructionSet(data.examples, other_tok, 192), data,
              resume=True)
    wider = GPT(GPTConfig(**{**config.__dict__, "block_size": 96}))
    with pytest.raises(CheckpointError, match="model.block_size=64, this run has model.block_size=96"):
        train(wider, tiny(steps=2, out_dir=out), data, data, resume=True)
    with pytest.raises(CheckpointError, match="targets=\\['c_attn', 'c_proj', 'c_fc'\\], this run has targets=\\['c_attn'\\]"):
        train(fresh(setup), tiny(steps=2, targets=("c_attn",), out_dir=out), data, data, resume=True)
    again = train(fresh(setup), tiny(steps=2, out_dir=out), data, data, resume=True)  # the same run: accepted
    assert len(again.losses) == 2


def _edit_state(path, edit):
    state = json.loads((path / "checkpoint" / "state.json").read_text())
    edit(state)
    (path / "checkpoint" / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(files={}), "'files' must give the sha256 of exactly"),  # no longer switches hashing off
    (lambda s: s["files"].pop("rng.safetensors"), "'files' must give"),
    (lambda s: s.update(step=-3), "step=-3"),
    (lambda s: s.pop("history"), "lacks the key 'history'"),
    (lambda s: s["history"].pop("tokens"), "lacks the key 'history.tokens'"),
    (lambda s: s.update(step="2"), "step='2', expected int"),
    (lambda s: s["history"]["losses"].__setitem__(0, 0.5), "integrity hash"),  # schema-valid, but edited
    (lambda s: s["run"].update(lr=0.5), "integrity hash"),
    (lambda s: s.pop("integrity"), "lacks the key 'integrity'"),
])
def test_state_json_is_validated_and_covered_by_its_hash(setup, tmp_path, edit, match):
    _, _, _, data = setup
    train(fresh(setup), tiny(steps=2, out_dir=str(tmp_path)), data)
    _edit_state(tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        train(fresh(setup), tiny(steps=2, out_dir=str(tmp_path)), data, resume=True)


# ----- non-finite settings and a diverging run (issue 13, item 9) -----

@pytest.mark.parametrize("field", ["lr", "alpha", "eps", "dropout", "min_lr_ratio", "grad_clip", "weight_decay"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "1e-3"])
def test_non_finite_or_negative_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be a finite number"):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="TrainConfig.lr must be a finite number > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="TrainConfig.betas"):
        TrainConfig(betas=(0.9, 1.0))


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    from minilora.runs import TrainingDiverged
    _, _, _, data = setup
    good = {}

    def poison(step, loss):  # after the checkpoint of step 2, a weight turns NaN (as an overflow would)
        if step == 2:
            good["state"] = (tmp_path / "checkpoint" / "state.json").read_bytes()
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if n.endswith("lora_B")).fill_(float("nan"))
    model = fresh(setup)
    with pytest.raises(TrainingDiverged, match="diverged at step 3: the loss is nan"):
        train(model, tiny(steps=6, save_every=1, out_dir=str(tmp_path)), data, callback=poison)
    assert (tmp_path / "checkpoint" / "state.json").read_bytes() == good["state"]
    assert json.loads(good["state"])["step"] == 2
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()
    resumed = train(fresh(setup), tiny(steps=6, save_every=1, out_dir=str(tmp_path)), data, resume=True)
    assert all(math.isfinite(x) for x in resumed.losses) and len(resumed.losses) == 6

    # a learning rate that is finite but absurd: the weights overflow, the run stops with the same error
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        train(fresh(setup), tiny(mode="full", lr=1e30, steps=20, out_dir=str(tmp_path / "big")), data)
    assert not (tmp_path / "big" / "model").exists() and not (tmp_path / "big" / "metrics.json").exists()
