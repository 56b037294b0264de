"""tools/variant_spread.py, the recorder behind notebook 09's trained comparisons: its file, without training.

Seeds recorded by separate processes land in one file; a file of another recipe is refused, not mixed; the
committed notebooks/variant_spread.json is one the tool wrote (its recipe, every arm on every seed)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("variant_spread", ROOT / "tools" / "variant_spread.py")
variant_spread = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(variant_spread)


def _record(seed: int, loss: float) -> dict:
    return {"command": "x", "recipe": variant_spread.RECIPE, "machine": "m", "recorded": "d",
            "runs": {str(seed): {"lora": {"loss": loss}}}}


def test_seeds_saved_by_separate_processes_share_the_file(tmp_path):
    out = tmp_path / "spread.json"
    variant_spread.save(out, _record(1, 0.5), 1)
    variant_spread.save(out, _record(0, 0.25), 0)
    variant_spread.save(out, _record(1, 0.75), 1)  # a seed's later arms replace its earlier record
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["0", "1"] and runs["0"]["lora"]["loss"] == 0.25 and runs["1"]["lora"]["loss"] == 0.75
    assert [p.name for p in tmp_path.iterdir()] == ["spread.json"], "a temporary file was left behind"


def test_a_file_of_another_recipe_is_refused(tmp_path, capsys):
    out = tmp_path / "spread.json"
    out.write_text(json.dumps({**_record(0, 0.5), "recipe": {**variant_spread.RECIPE, "steps": 1}}))
    with pytest.raises(ValueError, match="another recipe"):
        variant_spread.save(out, _record(0, 0.5), 0)
    assert variant_spread.main(["--out", str(out), "--seeds", "0"]) == 2
    assert "another recipe" in capsys.readouterr().err


def test_the_committed_record_is_complete():
    recorded = json.loads((ROOT / "notebooks" / "variant_spread.json").read_text())
    assert recorded["recipe"] == variant_spread.RECIPE
    assert len(recorded["runs"]) >= 3
    for arms in recorded["runs"].values():
        assert set(variant_spread.ARMS) | {"serving"} == set(arms)
