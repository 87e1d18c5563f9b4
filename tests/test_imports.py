"""No import cycle anywhere in the project (the scripts, common/, bench/, tests/): no module imports another that
imports it back, directly or through others, counting the imports inside functions (which hide a cycle until run
time) and the parent packages Python imports on the way (`common.server.app` runs `common/server/__init__.py`
first)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "bench", "tests")  # with the scripts beside them: the project's Python


def module_names(root: Path, packages=PACKAGES) -> dict[str, Path]:
    paths = list(root.glob("*.py")) + [p for package in packages for p in (root / package).rglob("*.py")]
    names = {}
    for path in paths:
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file, each with its parent packages."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):  # every scope, functions too
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) + 1 - node.level] + [node.module or ""]) if node.level \
                else node.module
            base = base.strip(".")
            # `from common import webpage` imports the module common.webpage; `from common.x import f`, common.x.
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    with_parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}
    return {m for m in with_parents if m in modules and m != name}


def cycles(root: Path, packages=PACKAGES) -> list[list[str]]:
    """The import cycles among root's modules, each once, as its shortest path that closes (a breadth-first search
    from each module's imports back to the module)."""
    modules = module_names(root, packages)
    graph = {name: sorted(imported(name, path, modules)) for name, path in modules.items()}
    found = []
    for start in sorted(graph):
        came_from, pending = dict.fromkeys(graph[start], start), list(graph[start])
        while pending and start not in came_from:
            node = pending.pop(0)
            for imports in graph[node]:
                if imports not in came_from:
                    came_from[imports] = node
                    pending.append(imports)
        if start in came_from:
            path, node = [start], came_from[start]
            while node != start:
                path.append(node)
                node = came_from[node]
            cycle = [start] + path[:0:-1] + [start]
            if not any(set(cycle) == set(seen) for seen in found):
                found.append(cycle)
    return found


def test_no_module_imports_another_that_imports_it_back():
    modules = module_names(ROOT)
    assert {"chat", "common.server.app", "common.webpage", "bench.serving"} <= set(modules)
    # The walk sees imports inside functions: chat.py imports the server only in main().
    assert "common.server.app" in imported("chat", modules["chat"], modules)
    assert cycles(ROOT) == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles(ROOT))


def test_the_check_finds_a_cycle_hidden_in_functions(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("from . import c\n")
    (tmp_path / "pkg" / "c.py").write_text("class C:\n    def m(self):\n        import pkg.a\n")
    (tmp_path / "pkg" / "d.py").write_text("from pkg.a import f\n")  # imports into the cycle, not part of it
    assert cycles(tmp_path, packages=["pkg"]) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
