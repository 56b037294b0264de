"""The README's "Read the code" table tells the truth: the line counts are the files', each file is short, the
path reads in one sitting, and none of its files imports the quantization speed machinery. Its "Layout" maps
the tree in a few lines, and the package root stays small."""
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
    assert sum(n for _, n in rows) <= 2700


def test_reading_order_files_do_not_import_the_speed_subpackage():
    for path, _ in reading_order():
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # anywhere in the file, inside functions too
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("fast" in n.split(".") for n in names), f"{path} imports {names}"


def test_layout_maps_the_tree_in_twelve_lines_and_the_root_stays_small():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1].strip("\n").splitlines()
    assert len(block) <= 12, f"the layout section has {len(block)} lines"
    folders = {p.name for p in (ROOT / "minilora").iterdir() if (p / "__init__.py").is_file()}
    for folder in folders:
        assert f"{folder}/" in "\n".join(block), f"the layout does not name minilora/{folder}/"
    root = sorted(p.name for p in (ROOT / "minilora").glob("*.py"))
    assert len(root) <= 15, f"{len(root)} modules at the package root (at most 16 with a second model): {root}"


def test_no_library_file_is_over_300_lines():
    for path in [*(ROOT / "minilora").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        n = len(path.read_text(encoding="utf-8").splitlines())
        assert n <= 300, f"{path.relative_to(ROOT)}: {n} lines"
