"""The pack's structure, read from its source (no ComfyUI needed): no import circle, no
import hidden in a function to dodge one, features that never import each other, an engine
that never imports ComfyUI, and tests, benchmarks and the lab apart."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACK = ["__init__.py", "cache_core", "nodes"]
FEATURES = ("step_cache", "edit_region", "token_pruning")


def _pack_files():
    for entry in PACK:
        path = ROOT / entry
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if module else []
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *(target.split(".") if target else [])])


def _imports(path: Path):
    """(imported module, line, inside a function) for every import of the pack's own modules."""
    module = _module_of(path)
    tree = ast.parse(path.read_text())
    known = {_module_of(p) for p in _pack_files()}
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = _resolve(module, path.name == "__init__.py", node.level, node.module)
            names = [f"{target}.{a.name}" for a in node.names]
            for name in names:
                hit = name if name in known else target
                yield hit, node.lineno, id(node) in inside
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                yield "<external>" + name, node.lineno, id(node) in inside


def _graph():
    graph = {}
    for path in _pack_files():
        graph[_module_of(path)] = {m for m, _, _ in _imports(path) if not m.startswith("<external>")}
    return graph


def test_the_pack_has_no_import_circle():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ that re-exports its own modules is not a circle of the code
    real = [c for c in cycles if not any(m == c[0].rsplit(".", 1)[0] for m in c[1:])]
    assert not real, real


def test_no_import_of_the_pack_is_hidden_in_a_function():
    """(The one exception is by design: ComfyUI's entry point loads the nodes, and with them
    ComfyUI, only when ComfyUI asks, so the engine stays usable without it.)"""
    hidden = [(str(p.relative_to(ROOT)), line, m) for p in _pack_files() for m, line, inner in _imports(p)
              if inner and not m.startswith("<external>")]
    assert [h for h in hidden if h[:1] != ("__init__.py",)] == [], hidden
    assert [m for _, _, m in hidden] == ["nodes"], hidden


def test_features_never_import_each_other():
    for path in _pack_files():
        module = _module_of(path)
        for feature in FEATURES:
            if module.startswith(f"nodes.{feature}"):
                others = [m for m, _, _ in _imports(path) if any(m.startswith(f"nodes.{o}") for o in FEATURES
                                                                  if o != feature)]
                assert not others, (module, others)
    for path in (ROOT / "nodes" / "runtime").rglob("*.py"):
        assert not [m for m, _, _ in _imports(path) if any(m.startswith(f"nodes.{f}") for f in FEATURES)], path


def test_the_engine_never_imports_comfyui():
    for path in (ROOT / "cache_core").rglob("*.py"):
        external = [m[len("<external>"):] for m, _, _ in _imports(path) if m.startswith("<external>")]
        assert not [m for m in external if m.split(".")[0] in ("comfy", "comfy_api", "comfy_extras", "server",
                                                              "folder_paths", "nodes")], path
        assert not [m for m, _, _ in _imports(path) if m.startswith("nodes")], path


def test_tests_benchmarks_and_the_lab_stay_apart():
    """The development support all three share is devkit/; benchmarks never import tests, and
    the pack imports none of them."""
    for path in (ROOT / "benchmarks").rglob("*.py"):
        text = path.read_text()
        assert "import tests" not in text and "from tests" not in text and "conftest" not in text, path
        assert "sys.path" not in text or path.name == "__init__.py", path
    for path in _pack_files():
        for m, _, _ in _imports(path):
            assert not m.startswith(("<external>tests", "<external>benchmarks", "<external>devkit")), (path, m)
