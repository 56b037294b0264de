"""benchmarks/kernel_speed.py's CPU parts: argument checks and the arithmetic of its table rows."""
import importlib.util
from pathlib import Path

import pytest


def _kernel_speed():
    path = Path(__file__).parents[1] / "benchmarks" / "kernel_speed.py"
    spec = importlib.util.spec_from_file_location("kernel_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_argument():
    ks = _kernel_speed()
    assert ks.shape_arg("4096x11008") == (4096, 11008)
    for bad in ("12", "0x5", "axb"):
        with pytest.raises(Exception, match="--shapes"):
            ks.shape_arg(bad)
    with pytest.raises(SystemExit):
        ks.main(["--tokens", "0", "--dry-run"])


def test_row_ratios_and_bandwidth():
    """bf16 takes 1 ms, minilora 0.25 ms, bnb 0.5 ms, 2e9 bytes moved at 4e12 B/s peak:
    ratios 4.00 / 0.50 / 2.00, minilora 2.00x bnb, 8000 GB/s = 200 % of peak."""
    ks = _kernel_speed()
    r = dict(t={"bf16": 1e-3, "minilora": 0.25e-3, "deq+mm": 2e-3, "bnb": 0.5e-3}, moved=2e9, peak=4e12,
             N=4096, K=4096, M=1, err=1e-3, model=3.84)
    r["pass"] = "fwd"
    cells = ks.row_text(r).replace("|", " ").split()
    assert cells[:9] == ["fwd", "4096x4096", "1", "4.00", "0.50", "2.00", "2.00", "8000", "200%"], cells


def test_without_bitsandbytes_the_bnb_cells_are_empty():
    """No bitsandbytes: the weight comes from minilora.quantize_nf4 and the bnb cells print nan."""
    ks = _kernel_speed()
    ks.have_bnb = lambda: False
    W, packed, st, q = ks.bnb_weight(8, 64, __import__("torch").device("cpu"))
    assert packed is None and st is None and q["packed"].numel() == 8 * 64 // 2 and W.shape == (8, 64)
    fns = ks.approaches("fwd", W[:1], W, packed, st, q, 8, 64)
    assert sorted(fns) == ["bf16", "deq+mm", "minilora"]
    r = dict(t={"bf16": 1e-3, "minilora": 0.5e-3, "deq+mm": 2e-3}, moved=1e9, peak=None, N=8, K=64, M=1,
             err=0.0, model=1.0)
    r["pass"] = "dX"
    cells = ks.row_text(r).replace("|", " ").split()
    assert cells[3:7] == ["2.00", "0.50", "nan", "nan"], cells
