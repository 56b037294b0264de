"""The one place that chooses between the reference code and the CPU speed path (machinery).

The reference files (blockwise.py, blockwise8bit.py) import this module, never quant/fast/ itself; the package
root (minilora/__init__.py) plugs the speed path in once both are imported. fast_path() then answers, at each
call, which path runs: quant/fast/ while it is plugged in and its ENABLED is true, else the reference
(tests/test_quant_fast.py runs both and compares the bytes)."""
_fast = None  # the module minilora.quant.fast, once plugged in


def plug(fast) -> None:
    """Make `fast` (a module with the reference's kernels and an ENABLED flag) the speed path."""
    global _fast
    _fast = fast


def fast_path():
    """minilora.quant.fast when it is plugged in and ENABLED, else None (run the reference)."""
    return _fast if _fast is not None and _fast.ENABLED else None
