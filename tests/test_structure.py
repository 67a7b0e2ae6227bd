"""The project's structure, checked from the source (every import statement, at module level or inside a
function): no import cycles between modules, and `search/` never imports torch, the worker packages
(`models`, `proxies`, `latency`) or the web (`api`, FastAPI, uvicorn)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "models", "proxies", "latency", "api")
FORBIDDEN_IN_SEARCH = ("torch", "models", "proxies", "latency", "api", "fastapi", "uvicorn", "starlette")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _runtime_nodes(tree: ast.AST):
    """Every node, except what sits under `if TYPE_CHECKING:` (annotations only: never imported)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if (
                isinstance(child, ast.If)
                and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING"
            ):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules `path` imports at run time (absolute names; `from a import b` is `a.b` when that is a
    module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {
        name: {m for m in imports(path, name, known) if m in known and m != name}
        for name, path in mods.items()
    }


def test_no_import_cycles():
    edges = graph()
    # A package's __init__ importing its own submodules is how a package is built, not a cycle; any other
    # path back to a module is.
    edges = {a: {b for b in bs if not b.startswith(f"{a}.")} for a, bs in edges.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_search_imports_no_torch_no_workers_no_web():
    offenders = []
    for name, path in modules().items():
        if name.split(".")[0] != "search":
            continue
        for imported in imports(path, name, set()):
            if imported.split(".")[0] in FORBIDDEN_IN_SEARCH:
                offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check itself can fail: two modules that import each other are reported."""
    package = tmp_path / "search"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from search import b\n")
    (package / "b.py").write_text("from search.a import f\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "PACKAGES", ("search",))
    try:
        test_no_import_cycles()
    except AssertionError as exc:
        assert "search.a -> search.b -> search.a" in str(exc) or "search.b -> search.a -> search.b" in str(
            exc
        )
    else:
        raise AssertionError("the cycle between search.a and search.b went unnoticed")
