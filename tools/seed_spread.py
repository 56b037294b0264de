"""Machinery: the demo's result over several seeds, recorded for notebook 05 (notebooks/seed_spread.json).

    for s in 0 1 2; do python -m minilora demo --seed $s --no-progress --out runs/demo-seed$s; done
    python tools/seed_spread.py runs/demo-seed0 runs/demo-seed1 runs/demo-seed2
    python tools/seed_spread.py --add runs/demo-seed3      # more seeds of the same recipe, into the same file

Each run directory's summary.json (written by the demo) gives, per mode, the exact match and validation loss
on the held-out sentences and the training time. The runs must share one recipe (every DemoConfig field but
the seed and where it wrote); the file records that recipe, so notebook 05 can refuse a spread measured with
another one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from minilora.runs.files import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
NOT_RECIPE = ("seed", "out", "overwrite", "cache", "progress", "n_show")  # DemoConfig fields a run may vary


def recipe(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_RECIPE}


def spread(run_dirs: list[Path]) -> dict:
    runs, first = [], None
    for d in run_dirs:
        path = d / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a finished demo run (python -m minilora demo --out {d})")
        summary = json.loads(path.read_text(encoding="utf-8"))
        if first is None:
            first = recipe(summary["config"])
        elif recipe(summary["config"]) != first:
            raise ValueError(f"{d}: another recipe than {run_dirs[0]}; record runs of one recipe together")
        rows = {r["mode"]: r for r in summary["rows"] if r["mode"] != "base"}
        runs.append({"seed": summary["config"]["seed"],
                     **{m: {"exact_match": r["eval"]["exact_match"], "loss": r["eval"]["loss"],
                            "seconds": round(r["seconds"], 1)} for m, r in rows.items()}})
    return {"command": "python -m minilora demo --seed S --no-progress", "recipe": first,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "recorded": time.strftime("%Y-%m-%d"), "runs": sorted(runs, key=lambda r: r["seed"])}


def add(old: dict, new: dict) -> dict:
    """new's runs added to old's: the recipe must be the same, and a seed is recorded once."""
    if old["recipe"] != new["recipe"]:
        raise ValueError("the runs were made with another recipe than the recorded ones; record them separately")
    seen = {r["seed"] for r in old["runs"]} & {r["seed"] for r in new["runs"]}
    if seen:
        raise ValueError(f"seed(s) {sorted(seen)} already recorded")
    machines = old["machine"] if old["machine"] == new["machine"] else f"{old['machine']}; {new['machine']}"
    return {**new, "machine": machines, "runs": sorted(old["runs"] + new["runs"], key=lambda r: r["seed"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="demo run directories (each with summary.json)")
    p.add_argument("--out", type=Path, default=ROOT / "notebooks" / "seed_spread.json")
    p.add_argument("--add", action="store_true", help="add these runs to the ones already recorded in --out")
    a = p.parse_args(argv)
    try:
        data = spread(a.runs)
        if a.add:
            data = add(json.loads(a.out.read_text(encoding="utf-8")), data)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(a.out, json.dumps(data, indent=1) + "\n")
    for r in data["runs"]:
        print(f"seed {r['seed']}: " + "  ".join(f"{m} {v['exact_match']:.1%} / {v['loss']:.4f}"
                                                for m, v in r.items() if m != "seed"))
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
