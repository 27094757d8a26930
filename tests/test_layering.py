"""The package's shape: no import circle among module-level imports, no module over 600 lines, and the small
shared helpers live at the bottom (critique_rl.primitives imports nothing of the package)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "critique_rl"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _module_level_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that importing ``name`` runs (module-level imports, TYPE_CHECKING blocks left
    out; ``from a.b import c`` runs a.b and, when c is a module, a.b.c; every package on the way runs too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    targets: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets.add(mod)
                targets.update(f"{mod}.{a.name}" for a in node.names)

    visit(tree.body)
    out: set[str] = set()
    for t in targets:
        parts = t.split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way run first
            m = ".".join(parts[:i])
            if m in modules and m != name and not name.startswith(m + "."):  # own ancestors are already running
                out.add(m)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:
        for v in graph:
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _module_level_imports(path, name, modules) for name, path in modules.items()}


def test_the_graph_walk_finds_a_circle_and_the_package_has_none(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "critique_rl.rewards.base" in graph and "critique_rl.tasks" in graph["critique_rl.rewards.base"]
    assert _cycles(graph) == []


def test_no_module_over_600_lines():
    sizes = {str(p.relative_to(ROOT.parent)): len(p.read_text(encoding="utf-8").splitlines()) for p in ROOT.rglob("*.py")}
    over = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_primitives_sit_at_the_bottom():
    graph = import_graph()
    assert graph["critique_rl.primitives"] == set()
    for helper_user in ("critique_rl.tasks.base", "critique_rl.rewards.builtin", "critique_rl.tasks.mixture"):
        assert "critique_rl.train.decision" not in graph[helper_user]
    from critique_rl.critics.openai_api import safe_url
    from critique_rl.primitives import completion_text, final_answer_span, parse_number
    from critique_rl.rewards.base import completion_text as re_exported

    assert re_exported is completion_text
    assert parse_number("so the answer is 1,234") == 1234.0 and final_answer_span("#### 7") == "7"
    assert safe_url("http://user:pw@127.0.0.1:8000/v1?key=x") == "http://127.0.0.1:8000/v1"


def _imports_anywhere(path: Path) -> set[str]:
    """Every module named by an import statement in ``path``, deferred (inside functions) ones included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


@pytest.mark.parametrize("lower,upper", [("critique_rl.tasks", "critique_rl.rewards"),
                                         ("critique_rl.tasks", "critique_rl.train"),
                                         ("critique_rl.rewards", "critique_rl.train"),
                                         ("critique_rl.rollout", "critique_rl.critics"),
                                         ("critique_rl.memory", "critique_rl.tasks")])
def test_no_import_runs_back_up_the_layers(lower, upper):
    """Not even a deferred import: tasks never reach rewards (the old rewards -> tasks -> tasks.mixture ->
    rewards circle), rewards and tasks never reach train, rollout engines never reach critics."""
    for name, path in _modules().items():
        if name == lower or name.startswith(lower + "."):
            up = {m for m in _imports_anywhere(path) if m == upper or m.startswith(upper + ".")}
            assert not up, f"{name} imports {sorted(up)} (a layer above it); import the helper from critique_rl.primitives"


@pytest.mark.parametrize("dead", ["critique_rl.train.selection:selection_state", "critique_rl.rollout.vllm:vllm_available",
                                  "critique_rl.memory.abstraction:describe"])
def test_dead_code_is_gone(dead):
    mod, name = dead.split(":")
    path = _modules()[mod]
    defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert name not in defined
