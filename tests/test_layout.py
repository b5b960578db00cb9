"""The package's shape: no import cycle (function-level imports included), no private name crossing modules, every
module importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "sae_lens_hierarchical"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
BENCHMARKS = ROOT.parent / "benchmarks"


def module_names() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def benchmark_names() -> dict[str, Path]:
    """``{benchmarks.<stem>: file}`` for every script of ``benchmarks/``, which import one another by their stems
    (run as scripts, ``benchmarks/`` is first on the path)."""
    return {f"benchmarks.{path.stem}": path for path in sorted(BENCHMARKS.glob("*.py"))}


def _local(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that an imported dotted ``name`` is (a package module, or a benchmark by its stem)."""
    if name.startswith(PACKAGE):
        return name
    return f"benchmarks.{name}" if f"benchmarks.{name}" in modules else None


def _imports(nodes: list[ast.stmt] | list[ast.AST], modules: dict[str, Path]) -> list[tuple[str, str]]:
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(target, "") for alias in node.names if (target := _local(alias.name, modules))]
        elif isinstance(node, ast.ImportFrom) and node.module and (target := _local(node.module, modules)):
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, "") if submodule in modules else (target, alias.name))
    return found


def all_imports(source: str, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """``(imported module of ours, imported name or '')`` for every import, inside functions and methods too: a
    deferred import is still a dependency."""
    return _imports(list(ast.walk(ast.parse(source))), modules)


def import_graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every import of the package and of ``benchmarks/`` (or of ``sources``,
    ``{module name: source}``)."""
    modules = module_names() | benchmark_names()
    if sources is None:
        sources = {name: path.read_text() for name, path in modules.items()}
    known = {**modules, **dict.fromkeys(sources, Path())}
    return {
        name: {target for target, _ in all_imports(source, known) if target != name} for name, source in sources.items()
    }


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Every set of two or more modules that import one another in a circle (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# Lines a module may have (SAELens's own measure: its topk_sae.py is 594).
MAX_LINES, MAX_ARCHITECTURE_LINES = 450, 600


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_a_function_level_import_closes_a_circle() -> None:
    """A planted cycle whose back edge is an import inside a function: the module-level graph misses it, the full
    graph does not."""
    planted = {
        f"{PACKAGE}.planted_a": f"from {PACKAGE}.planted_b import helper\n",
        f"{PACKAGE}.planted_b": f"def helper():\n    from {PACKAGE}.planted_a import thing\n    return thing\n",
    }
    graph = import_graph(planted)
    assert find_cycle(graph) == [f"{PACKAGE}.planted_a", f"{PACKAGE}.planted_b", f"{PACKAGE}.planted_a"]
    module_level = {name: {t for t, _ in _imports(ast.parse(src).body, {})} for name, src in planted.items()}
    assert find_cycle(module_level) is None


def test_a_circle_between_benchmark_scripts_is_found() -> None:
    """Benchmarks import one another by their stems (``from bench_step_rows import ...``); those edges count too."""
    planted = {
        "benchmarks.planted_a": "import planted_b\n",
        "benchmarks.planted_b": "def helper():\n    from planted_a import thing\n    return thing\n",
    }
    assert find_cycle(import_graph(planted)) == ["benchmarks.planted_a", "benchmarks.planted_b", "benchmarks.planted_a"]
    assert "benchmarks.bench_step_rows" in import_graph()["benchmarks.bench_step"]  # the real scripts' edges are seen


def test_no_import_cycle() -> None:
    """No circle in the graph of all imports, function-level ones included."""
    graph = import_graph()
    assert len(graph) > 15, sorted(graph)  # the walk saw the whole package
    assert [sorted(circle) for circle in strongly_connected(graph)] == []


def test_module_sizes() -> None:
    """Every module of the package and benchmarks/ within MAX_LINES (the architecture within MAX_ARCHITECTURE_LINES):
    a module that grows past it is split by concern."""
    repo = ROOT.parent
    over = {}
    for path in sorted([*ROOT.rglob("*.py"), *BENCHMARKS.glob("*.py")]):
        name = path.relative_to(repo).as_posix()
        limit = MAX_ARCHITECTURE_LINES if name == f"{PACKAGE}/hierarchical_topk_sae.py" else MAX_LINES
        lines = len(path.read_text().splitlines())
        if lines > limit:
            over[name] = lines
    assert over == {}


def test_no_private_name_crosses_modules() -> None:
    """A name with a leading underscore is its module's own; private modules serve only their own folder (the
    package's and the benchmarks' alike, imports inside functions included)."""
    modules = module_names() | benchmark_names()
    offenders = []
    for importer, path in modules.items():
        for target, name in all_imports(path.read_text(), modules):
            if name.startswith("_"):
                offenders.append(f"{importer} imports {target}.{name}")
            private_parts = [part for part in target.split(".")[1:] if part.startswith("_")]
            if private_parts and not importer.startswith(target.rsplit(".", 1)[0]):
                offenders.append(f"{importer} imports the private module {target}")
    assert offenders == []


# Run in a fresh interpreter: load the third-party stack once, then fork one child per package module, which imports
# that module first and alone (the children share the loaded libraries, never a module of this package).
_IMPORT_EACH_ALONE = """
import importlib, os, sys, traceback
import torch, sae_lens, transformer_lens, datasets  # noqa: F401  (shared by the children, not ours)
assert not [name for name in sys.modules if name.startswith("sae_lens_hierarchical")]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Import order cannot hide a cycle or a missing import: each module is imported first, alone."""
    names = [name for name in module_names() if name != f"{PACKAGE}.losses.triton_kernels" or _installed("triton")]
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_ALONE, *names], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _installed(distribution: str) -> bool:
    from importlib.util import find_spec

    return find_spec(distribution) is not None


def test_the_readme_layout_table_names_every_module() -> None:
    """The README's layout table is the map a newcomer reads: every module of the package and every benchmark script
    is named there (as `name`, `name.py` or, for a folder, `folder/`)."""
    readme = (ROOT.parent / "README.md").read_text()
    table = readme[readme.index("\n## Layout") :].split("\n## ", 2)[1]
    missing = []
    for name, path in (module_names() | benchmark_names()).items():
        stem = path.parent.name if path.stem == "__init__" else path.stem
        spellings = (f"`{stem}`", f"`{stem}.py`", f"`{stem}/`", f"`{path.relative_to(ROOT.parent).as_posix()}`")
        if not any(spelling in table for spelling in spellings):
            missing.append(name)
    assert missing == []
