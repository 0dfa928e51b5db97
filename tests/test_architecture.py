"""The package's shape: its modules import each other without a circle, lazy imports inside functions included (a
circle held together by a lazy import is still a circle), and only downwards through the layers below; no module is
longer than a reader can hold."""

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


# The packages from the bottom up: a module imports from its own layer and the layers below it, never above
# (lazy imports included). README's Layout section walks the same order.
LAYERS = (
    ("mapoco.answers", "mapoco.tasks"),  # questions and grading: plain Python
    ("mapoco.models",),  # specs of the tiny models and the registry that finds any model's folder
    ("mapoco.config",),  # the typed run configuration and its validation
    ("mapoco.runtime",),  # Ray: cluster, placement, actor groups, devices, precision, logs
    ("mapoco.weights",),  # weight movement: the sync interface, one module per transport with its engine side
    ("mapoco.rollout",),  # engines, the discussion, verifiers, rewards
    ("mapoco.evaluation",),  # eval runs, metrics, the run folder's reports
    ("mapoco.training",),  # the trainer, learners, algorithms, weight sync, checkpoints
    ("mapoco.conductor",),  # the second method, on training's loop
    ("mapoco.planning", "mapoco.serving", "mapoco.testbed"),  # tools over everything below
    ("mapoco.cli", "mapoco.__main__"),
)
MAX_LINES = 450


def layer_of(module: str) -> int:
    for index, packages in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in packages):
            return index
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_imports_only_go_down_the_layers():
    upward = [f"{a} -> {b}" for a, deps in import_graph().items() for b in deps if layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("mapoco.config.validate") < layer_of("mapoco.training.algorithms")
    assert layer_of("mapoco.testbed.build") > layer_of("mapoco.conductor.workflow")


def test_no_module_is_too_long_to_hold_in_mind():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


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


def test_one_trainer_for_every_method_and_no_sample_id_is_parsed():
    """Methods plug into the trainer (``training.method.Method``) instead of subclassing it, and a sample's question
    group is a field (``Problem.group``), never recovered from its id string."""
    subclasses, parsed = [], []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        subclasses += [f"{path.name}:{node.name}" for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                       and any(isinstance(base, ast.Name) and base.id == "Trainer" for base in node.bases)]
        parsed += [f"{path.name}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and isinstance(node.func, ast.Attribute) and node.func.attr in ("split", "rsplit", "partition")
                   and any(isinstance(arg, ast.Constant) and arg.value == "#" for arg in node.args)]
    assert not subclasses and not parsed, (subclasses, parsed)


def test_the_tests_mirror_the_package():
    """A module's tests sit in the folder of its package (tests/training/ for mapoco/training/); the tests of the
    project as a whole (README, install, experiments, layers) at the top."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert folders and folders <= packages | modules, sorted(folders - packages - modules)
    assert not {p.stem.removeprefix("test_") for p in tests.glob("test_*.py")} & packages, "a package's tests at the top"
