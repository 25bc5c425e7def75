"""The package's folders are its layers, imports run one way (CONTRIBUTING.md, "The layers"),
and files, functions and argument lists stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spd_lightning"

# Lowest layer first. A module imports from its own folder and from folders of lower layers only.
LAYERS = [
    {"errors", "core"},
    {"models"},
    {"targets"},
    {"data"},
    {"verification", "toy"},
    {"judge"},
    {"decoding"},
    {"reporting"},
    {"training"},
    {"tasks"},
]
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}

# Third-party frameworks, and the only folders that may import them.
FRAMEWORKS = {"lightning": {"training", "tasks"}, "hydra": {"tasks"}, "omegaconf": {"tasks"}, "requests": {"targets"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, imported at the top of the file) for every import in `path`, deferred ones included."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from spd_lightning.x import y` where y is a module imports spd_lightning.x.y
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            found += [(name, id(node) in top) for name in subs or [node.module]]
    return found


def internal_graph() -> dict[str, set[str]]:
    return {name: {dep for dep, _ in imports(path) if dep in MODULES and dep != name} for name, path in MODULES.items()}


def folder(module: str) -> str:
    """spd_lightning.core.grpo -> core; spd_lightning.errors -> errors."""
    return module.split(".")[1] if "." in module else ""


def test_every_folder_has_a_layer():
    folders = {folder(m) for m in MODULES} - {""}
    assert folders == set(RANK), f"give these folders a layer in LAYERS: {folders ^ set(RANK)}"


def test_imports_only_go_down_the_layers():
    upward = [
        f"{src} imports {dep}"
        for src, deps in internal_graph().items()
        for dep in deps
        if folder(src) and folder(dep) and folder(dep) != folder(src) and RANK[folder(dep)] >= RANK[folder(src)]
    ]
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    assert find_cycle(internal_graph()) is None, " -> ".join(find_cycle(internal_graph()))


def test_find_cycle_sees_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_of_the_package_is_deferred_into_a_function():
    deferred = [
        f"{name}: {dep}"
        for name, path in MODULES.items()
        for dep, at_top in imports(path)
        if dep.startswith("spd_lightning") and not at_top
    ]
    assert not deferred, "imports of the package inside functions (they hide cycles):\n" + "\n".join(deferred)


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_frameworks_are_imported_only_by_their_layers(framework):
    allowed = FRAMEWORKS[framework]
    wrong = sorted(
        name
        for name, path in MODULES.items()
        if folder(name) not in allowed and any(dep.split(".")[0] == framework for dep, _ in imports(path))
    )
    assert not wrong, f"{framework} is imported outside {sorted(allowed)}: {wrong}"


def test_importing_the_core_math_loads_no_framework():
    core = sorted(m for m in MODULES if folder(m) == "core")
    code = (
        f"import sys; import {', '.join(core)}; "
        "print(sorted(m for m in ('lightning', 'hydra', 'omegaconf', 'requests') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"importing {core} loaded {loaded.strip()}"


# The house rules (CONTRIBUTING.md): files stay small, functions short, argument lists short.
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 400, 60, 7
SOURCES = sorted(p for folder in ("spd_lightning", "bench", "tests") for p in (PACKAGE.parent / folder).rglob("*.py"))
SOURCES.append(PACKAGE.parent / "run.py")


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]


def is_constructor(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """__init__, or an alternate constructor (`from_pretrained`, `from_jsonl`): their parameters are the settings."""
    return node.name == "__init__" or node.name.startswith("from_")


def where(path: Path, node=None) -> str:
    return f"{path.relative_to(PACKAGE.parent)}" + (f":{node.lineno} {node.name}" if node else "")


def test_no_file_is_over_400_lines():
    long = [f"{where(p)} ({n})" for p in SOURCES if (n := p.read_text().count("\n")) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_over_60_lines():
    long = [
        f"{where(p, f)} ({n})"
        for p in SOURCES
        for f in functions(p)
        if (n := f.end_lineno - f.lineno + 1) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_function_takes_more_than_7_parameters():
    many = [
        f"{where(p, f)} ({len(parameters(f))})"
        for p in SOURCES
        for f in functions(p)
        if len(parameters(f)) > MAX_PARAMETERS and not is_constructor(f)
    ]
    assert not many, f"functions with more than {MAX_PARAMETERS} parameters (group them in a dataclass): {many}"
