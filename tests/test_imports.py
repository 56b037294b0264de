"""Imports point downward: no cycle between any two modules of minilora (minilora.kernels included), counting
every import, at module level and inside functions alike."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"minilora": ROOT / "minilora", "minilora.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package is its __init__.py)."""
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if prefix == "minilora" and parts[0] == "kernels":
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((prefix, *parts))] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file. `from X import a` names the module X.a
    when there is one, else X; a relative import resolves against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring modules on the current path)."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_walk_sees_imports_inside_functions_and_relative_ones():
    edges = graph()
    assert "minilora.kernels" in edges["minilora.nf4_linear"]  # imported inside a method
    assert "minilora.quant.format" in edges["minilora.kernels.ops"]
    assert "minilora.optim.pager" in edges["minilora.optim.paged"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_any_two_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_reference_quantization_imports_nothing_from_the_speed_subpackage():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("minilora.quant.") and not name.startswith("minilora.quant.fast") \
                and name != "minilora.quant.dispatch":
            fast = sorted(t for t in targets if t.startswith("minilora.quant.fast"))
            assert not fast, f"{name} imports {fast}"
