"""The README's "Read the code" table tells the truth: the line counts are the files', each file is short, the
path reads in one sitting, and none of its files pulls in the quantization speed machinery when imported."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def reading_order() -> list[tuple[str, int]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Read the code", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", section, flags=re.M)
    return [(path, int(n)) for path, n in rows]


def test_reading_order_counts_are_the_files_and_fit_one_sitting():
    rows = reading_order()
    assert len(rows) >= 10, rows
    for path, n in rows:
        actual = len((ROOT / path).read_text(encoding="utf-8").splitlines())
        assert actual == n, f"README says {path} has {n} lines, it has {actual}"
        assert n <= 250, f"{path}: {n} lines (a reading-order file is at most 250)"
    assert sum(n for _, n in rows) <= 2000


def test_reading_order_files_do_not_import_the_speed_subpackage_at_module_level():
    for path, _ in reading_order():
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        for node in tree.body:  # module level only: a function may import quant.fast when it applies
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("fast" in n.split(".") for n in names), f"{path} imports {names} at module level"


def test_no_library_file_is_over_300_lines():
    for path in [*(ROOT / "minilora").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        n = len(path.read_text(encoding="utf-8").splitlines())
        assert n <= 300, f"{path.relative_to(ROOT)}: {n} lines"
