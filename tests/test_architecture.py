"""The package's shape: its modules import each other without a circle, lazy imports inside functions included (a
circle held together by a lazy import is still a circle)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mapoco"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_validation_does_not_pull_in_the_conductor():
    """Checking a config (config -> models) must not import the Conductor's modules or an engine (vLLM)."""
    graph, seen, todo = import_graph(), set(), ["mapoco.config"]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    assert not {m for m in seen if m.startswith("mapoco.conductor")}, seen
    assert "mapoco.rollout.engine" not in seen and "mapoco.rollout.discussion" not in seen


def test_every_benchmark_module_imports():
    """`make bench` imports them all before it runs any: a name one of them lost fails here, not at the bench."""
    import importlib

    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        importlib.import_module(f"benchmarks.{path.stem}")
