"""Machinery: LoRA's variants fine-tuned on the Yoda task over several seeds, recorded for notebook 09.

    nice -n 10 python tools/variant_spread.py                       # every arm, seeds 0 1 2, one after another
    python tools/variant_spread.py --arms qlora2 loftq2 --seeds 0   # some arms: added to the file's others

The committed file was recorded one seed per process, side by side (34 minutes on 2 busy shared cores):

    for s in 0 1 2; do nice -n 10 python tools/variant_spread.py --seeds $s --threads 1 & done; wait

Every arm fine-tunes the demo's cached base (minilora.demos.get_base) with one short recipe (RECIPE: steps,
batch, learning rate, rank) and is scored on the held-out sentences (validation loss and exact match):

    lora      LoRA on the demo's targets (the Yoda adapter of the mixed batch)
    dora      DoRA one rank lower: its magnitude vectors fill the gap, so it trains no more parameters than lora
    qlora4    QLoRA: NF4 base, B = 0                           qlora2, loftq2, pissa2: the same on a 2-bit base
    loftq4    QLoRA started by LoftQ (RECIPE's loftq_iter)
    pissa4    QPiSSA: the principal part in the adapter, the residual in NF4
    question  LoRA on the second task (minilora.data.questions: the same sentences as yes/no questions)

For a quantized arm it also records, before training, every layer's ‖W − (deq(Q) + s·B A)‖ / ‖W‖. Once lora and
question are both trained for a seed, it records the base and each adapter on both tasks, and one mixed batch
(every held-out example of both tasks, each row naming its adapter) against each adapter run alone.

The file (notebooks/variant_spread.json) holds the recipe, the machine and, per seed and arm, what was measured;
it is rewritten (atomically) after every arm, so a cut-off recording keeps what it finished. A file recorded
with another recipe is refused rather than mixed with this one.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from minilora import GPT, adapter_names, load_adapter, lora_layers, save_adapter, set_adapter
from minilora.data import InstructionSet, load_tokenizer, yoda_dataset
from minilora.data.questions import question_dataset
from minilora.demos import DemoConfig, get_base
from minilora.evaluate import evaluate, greedy_matches
from minilora.runs.files import atomic_write_json
from minilora.train import TrainConfig, prepare_model, train

ROOT = Path(__file__).resolve().parent.parent
# One recipe for every arm: the demo's base, data sizes, learning rate, warm-up, rank and targets, a short run.
RECIPE = {"base": "minilora.demos.get_base(DemoConfig())", "n_train": 2000, "n_val": 200, "steps": 200,
          "batch_size": 16, "lr": 5e-3, "warmup_steps": 10, "r": 16, "alpha": 64.0,
          "targets": ["c_attn", "c_proj", "c_fc", "lm_head"], "loftq_iter": 5, "dora_r": 15}
ARMS = {  # name -> (task, TrainConfig settings beyond the recipe's, bits of the frozen base: 32 = not quantized)
    "lora": ("yoda", {"mode": "lora"}, 32),
    "dora": ("yoda", {"mode": "lora", "use_dora": True, "r": RECIPE["dora_r"], "alpha": 4.0 * RECIPE["dora_r"]}, 32),
    "question": ("question", {"mode": "lora"}, 32),
    **{f"{kind}{bits}": ("yoda", {"mode": "qlora", **init}, bits) for bits in (4, 2) for kind, init in
       (("qlora", {}), ("loftq", {"init": "loftq", "loftq_iter": RECIPE["loftq_iter"]}), ("pissa", {"init": "pissa"}))},
}
TASKS = {"yoda": yoda_dataset, "question": question_dataset}


def train_config(arm: str, seed: int) -> TrainConfig:
    _, settings, bits = ARMS[arm]
    kw = dict(r=RECIPE["r"], alpha=RECIPE["alpha"], targets=tuple(RECIPE["targets"]), steps=RECIPE["steps"],
              lr=RECIPE["lr"], warmup_steps=RECIPE["warmup_steps"], batch_size=RECIPE["batch_size"], seed=seed,
              progress=False, compute_dtype="float32")
    return TrainConfig(**{**kw, **settings, **({"bits": bits} if bits < 32 else {})})


def start_errors(base: GPT, cfg: TrainConfig) -> dict[str, float]:
    """Per quantized layer, ‖W − (deq(Q) + s·B A)‖ / ‖W‖: how far the model starts from the base it quantizes."""
    model = prepare_model(copy.deepcopy(base), cfg)
    out = {}
    for name, layer in lora_layers(model).items():
        if not hasattr(layer.base_layer, "dequantized_weight"):
            continue  # the tied lm_head keeps its full-precision weight
        w = base.get_submodule(name).weight.detach().float()
        start = layer.base_layer.dequantized_weight(torch.float32) + layer.delta_weight()
        out[name] = ((w - start).norm() / w.norm()).item()
    return out


@torch.no_grad()
def serve_both(yoda_model, question_dir: Path, sets: dict[str, InstructionSet], base: GPT) -> dict:
    """The Yoda adapter and the question adapter on one base: each on both tasks, then one mixed batch of both
    tasks' held-out examples, each row through its own adapter, against each adapter's rows run alone."""
    model = copy.deepcopy(yoda_model).eval()
    load_adapter(model, question_dir, adapter_name="question")
    yoda_name = next(n for n in adapter_names(model) if n != "question")
    out = {"cross": {}}
    for who, adapter in (("yoda adapter", yoda_name), ("question adapter", "question"), ("base", None)):
        for task, data in sets.items():
            if adapter:
                set_adapter(model, adapter)
            ev = evaluate(model if adapter else base, data)
            out["cross"][f"{who} on {task}"] = {"loss": ev["loss"], "exact_match": ev["exact_match"]}
    both = InstructionSet(sets["yoda"].examples + sets["question"].examples, sets["yoda"].tokenizer,
                          sets["yoda"].block_size)
    names = [yoda_name] * len(sets["yoda"]) + ["question"] * len(sets["question"])
    x, y = both.collate(list(range(len(both))))
    mixed = model(x, adapter_names=names)
    gap, alone_hits = 0.0, 0
    for adapter in (yoda_name, "question"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        set_adapter(model, adapter)
        alone = model(x[rows])  # the same padded rows, through this adapter alone
        gap = max(gap, ((mixed[rows] - alone).flatten(1).norm(dim=1) / alone.flatten(1).norm(dim=1)).max().item())
        alone_hits += int(greedy_matches(alone, y[rows]).sum())
    out["mixed_batch"] = {"rows": len(names), "max_relative_logit_gap": gap,
                          "exact_match_mixed": int(greedy_matches(mixed, y).sum()) / len(names),
                          "exact_match_alone": alone_hits / len(names)}
    return out


def record_seed(seed: int, arms: list[str], base: GPT, base_dir: Path, tok, record: dict, save) -> None:
    runs = record["runs"].setdefault(str(seed), {})
    sets = {task: InstructionSet(make(RECIPE["n_train"], RECIPE["n_val"], seed=seed)[1], tok, base.config.block_size)
            for task, make in TASKS.items()}
    trained = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:
            task, _, bits = ARMS[arm]
            cfg = train_config(arm, seed)
            train_set = InstructionSet(TASKS[task](RECIPE["n_train"], RECIPE["n_val"], seed=seed)[0], tok,
                                       base.config.block_size)
            row = {"bits": bits, "trainable": None}
            if cfg.mode == "qlora":
                row["start_error"] = start_errors(base, cfg)
            t = time.perf_counter()
            res = train(GPT.from_pretrained(base_dir), cfg, train_set, sets[task])
            row.update(trainable=res.params.trainable, loss=res.final["loss"], exact_match=res.final["exact_match"],
                       seconds=round(time.perf_counter() - t, 1))
            runs[arm] = row
            print(f"seed {seed} {arm:>8}: val loss {row['loss']:.4f}, exact match {row['exact_match']:.1%}, "
                  f"{row['trainable']:,} trainable, {row['seconds']:.0f} s", flush=True)
            if arm in ("lora", "question"):
                trained[arm] = res.model
                if arm == "question":
                    save_adapter(res.model, Path(tmp) / "question")
            save()
        if {"lora", "question"} <= trained.keys():
            runs["serving"] = serve_both(trained["lora"], Path(tmp) / "question", sets, base)
            print(f"seed {seed} serving: {json.dumps(runs['serving'])}", flush=True)
            save()


def save(out: Path, record: dict, seed: int) -> None:
    """Write this seed's runs into out, keeping what other processes (other seeds) wrote there meanwhile."""
    lock = os.open(out.parent, os.O_RDONLY)  # machinery: one writer at a time (flock on the folder)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {**record, "runs": {}}
        if current.get("recipe") != RECIPE:
            raise ValueError(f"{out} was recorded with another recipe; move it away to record this one")
        current["runs"][str(seed)] = record["runs"][str(seed)]
        current["runs"] = dict(sorted(current["runs"].items(), key=lambda kv: int(kv[0])))
        atomic_write_json(out, current)
    finally:
        os.close(lock)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (several seeds may run side by side)")
    p.add_argument("--out", type=Path, default=ROOT / "notebooks" / "variant_spread.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    record = {"command": "python tools/variant_spread.py", "recipe": RECIPE,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                         f"torch {torch.__version__}", "recorded": time.strftime("%Y-%m-%d"), "runs": {}}
    if a.out.is_file():
        old = json.loads(a.out.read_text(encoding="utf-8"))
        if old.get("recipe") != RECIPE:
            print(f"error: {a.out} was recorded with another recipe; move it away to record this one", file=sys.stderr)
            return 2
        record["runs"] = old["runs"]
    base_dir, _ = get_base(DemoConfig(progress=False))
    base, tok = GPT.from_pretrained(base_dir).eval(), load_tokenizer(base_dir)
    t0 = time.perf_counter()
    for seed in a.seeds:
        record_seed(seed, a.arms, base, base_dir, tok, record, lambda: save(a.out, record, seed))
    print(f"{len(a.arms)} arms x {len(a.seeds)} seeds in {time.perf_counter() - t0:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
