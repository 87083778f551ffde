"""The layering rules of docs/design.md, checked on the source with `ast` (nothing is imported).

- no module in commands/ imports another module in commands/;
- the math packages (pruning/, refine/, adapters/, sparsity/) never import a command, the run
  directory, the config, the engine or the pipeline;
- no import cycle between sparse_recover modules at load time (module-level imports only: a
  function-local import is how `--help` stays fast and runs after every module has loaded), and
  `plan` and `commands.run` do not import each other at any level;
- no script imports a command (scripts use the engine).

Every failure lists each offending edge as `file:line -> module`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "sparse_recover"

MATH_PACKAGES = ("pruning", "refine", "adapters", "sparsity")
# what the math never sees; design.md names the engine `engine/` or `stages.py`
ABOVE_THE_MATH = ("commands", "rundir", "config", "engine", "stages", "pipeline")


# --------------------------------------------------------------------------------------------------
# the walker


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    file: str  # its file, relative to the walked root
    line: int
    target: str  # imported module, dotted (the most specific module of the package that exists)
    top_level: bool  # runs when the importing module loads (not inside a function, not under TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.file}:{self.line} -> {self.target}" + ("" if self.top_level else " (inside a function)")


def module_name(path: Path, root: Path) -> str:
    """Dotted name of a source file below `root` (the folder that holds the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` (a folder under `root`) -> its file."""
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(node, top_level) for every import statement, at any depth."""
    def visit(node: ast.AST, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, top
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), top)
            else:
                yield from visit(child, top)

    yield from visit(tree, True)


def _resolve_from(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    """The absolute module of `from X import ...`, relative imports included."""
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _most_specific(name: str, known: set[str]) -> str:
    """`pkg.mod.func` -> `pkg.mod` when that is the module that exists."""
    while name and name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def file_edges(path: Path, source: str, *, is_package: bool, known: set[str], prefix: str,
               label: str) -> list[Edge]:
    """Imports of one file whose target lies inside `prefix` (the package), resolved to modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node, top in _imports(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _resolve_from(node, source, is_package)
            # `from pkg import mod` imports the submodule pkg.mod; `from pkg.mod import func` imports pkg.mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in dict.fromkeys(targets):
            if target == prefix or target.startswith(prefix + "."):
                out.append(Edge(source, label, node.lineno, _most_specific(target, known), top))
    return out


def package_edges(root: Path, package: str) -> list[Edge]:
    modules = package_modules(root, package)
    known = set(modules)
    edges = []
    for name, path in modules.items():
        edges += file_edges(path, name, is_package=path.name == "__init__.py", known=known, prefix=package,
                            label=path.relative_to(root).as_posix())
    return edges


def script_edges(scripts: Path, root: Path, package: str) -> list[Edge]:
    known = set(package_modules(root, package))
    edges = []
    for path in sorted(scripts.glob("*.py")):
        edges += file_edges(path, f"scripts.{path.stem}", is_package=False, known=known, prefix=package,
                            label=path.relative_to(root).as_posix())
    return edges


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """The edges of every strongly connected component with more than one module (Tarjan), plus
    self-imports; each component's edges sorted by file and line."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:  # recursion depth <= number of modules (~60)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    out = []
    for comp in components:
        inside = [e for e in edges if e.source in comp and e.target in comp]
        if len(comp) > 1 or inside:
            out.append(sorted(inside, key=lambda e: (e.file, e.line)))
    return sorted(out, key=lambda c: (c[0].file, c[0].line))


# --------------------------------------------------------------------------------------------------
# the rules, as functions of the edges (so the self-test runs them on a synthetic package)


def commands_to_commands(edges: list[Edge], package: str) -> list[Edge]:
    cmds = f"{package}.commands"
    return [e for e in edges if within(e.source, cmds) and within(e.target, cmds) and e.target != e.source]


def math_to_above(edges: list[Edge], package: str) -> list[Edge]:
    math = [f"{package}.{m}" for m in MATH_PACKAGES]
    above = [f"{package}.{m}" for m in ABOVE_THE_MATH]
    return [e for e in edges if any(within(e.source, m) for m in math) and any(within(e.target, a) for a in above)]


def load_time_cycles(edges: list[Edge]) -> list[list[Edge]]:
    return cycles([e for e in edges if e.top_level])


def between(edges: list[Edge], a: str, b: str) -> list[Edge]:
    return [e for e in edges if (e.source, e.target) in ((a, b), (b, a))]


def scripts_to_commands(edges: list[Edge], package: str) -> list[Edge]:
    return [e for e in edges if within(e.target, f"{package}.commands")]


def report(title: str, edges: list[Edge]) -> str:
    return f"{title} ({len(edges)}):\n" + "\n".join(f"  {e}" for e in edges)


def refuse(title: str, edges: list[Edge]) -> None:
    """Fail with the list of edges only (pytest's repr of the Edge list would bury it)."""
    if edges:
        pytest.fail(report(title, edges), pytrace=False)


# --------------------------------------------------------------------------------------------------
# the rules on sparse_recover


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return package_edges(ROOT, PACKAGE)


def test_walker_sees_the_package(edges):
    """Guard against a vacuous pass: the walk finds the modules and the imports we know are there."""
    modules = package_modules(ROOT, PACKAGE)
    assert {"sparse_recover.cli", "sparse_recover.sparsity.masks", "sparse_recover.pruning"} <= set(modules)
    assert len(edges) > 50
    # the math imports the math at load time; the CLI imports its commands lazily
    assert any(within(e.source, "sparse_recover.pruning") and within(e.target, "sparse_recover.sparsity")
               and e.top_level for e in edges)
    assert any(e.source == "sparse_recover.cli" and not e.top_level for e in edges)


def test_commands_do_not_import_each_other(edges):
    refuse("imports between modules of sparse_recover/commands/ (move shared code to the engine)",
           commands_to_commands(edges, PACKAGE))


def test_math_never_sees_commands_rundir_config_engine(edges):
    refuse("imports from the math packages (pruning/, refine/, adapters/, sparsity/) to commands, rundir, config, "
           "engine or pipeline", math_to_above(edges, PACKAGE))


def test_no_load_time_import_cycle(edges):
    found = load_time_cycles(edges)
    if found:
        pytest.fail(f"{len(found)} import cycle(s) among module-level imports:\n" + "\n".join(
            report(" <-> ".join(sorted({e.source for e in c})), c) for c in found), pytrace=False)


def test_plan_and_run_do_not_import_each_other(edges):
    refuse("imports between sparse_recover.plan and sparse_recover.commands.run at any level (share a pipeline "
           "module instead)", between(edges, f"{PACKAGE}.plan", f"{PACKAGE}.commands.run"))


def test_scripts_do_not_import_commands():
    refuse("scripts importing sparse_recover.commands (import the engine instead)",
           scripts_to_commands(script_edges(ROOT / "scripts", ROOT, PACKAGE), PACKAGE))


# --------------------------------------------------------------------------------------------------
# the walker and the rules on a synthetic package with one violation of each kind


SYNTHETIC = {
    "pkg/__init__.py": "",
    "pkg/config.py": "X = 1\n",
    "pkg/plan.py": "def f():\n    from pkg.commands.run import g\n",
    "pkg/a.py": "from pkg import b\n",
    "pkg/b.py": "import pkg.c\n",
    "pkg/c.py": "from .a import thing\n",  # a -> b -> c -> a: a cycle
    "pkg/lazy.py": "def f():\n    from pkg import lazy2\n",
    "pkg/lazy2.py": "from pkg import lazy\n",  # lazy2 -> lazy at load time, lazy -> lazy2 only in a function
    "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import typed2\n",
    "pkg/typed2.py": "import pkg.typed\n",
    "pkg/commands/__init__.py": "",
    "pkg/commands/prune.py": "import os\nfrom pkg.config import X\ndef helper():\n    pass\n",
    "pkg/commands/dsnot.py": "def run():\n    from .prune import helper\n",
    "pkg/commands/run.py": "from ..plan import f\nfrom . import prune\n",
    "pkg/commands/ok.py": "from pkg.config import X\nfrom pkg.sparsity.masks import keep\n",
    "pkg/sparsity/__init__.py": "",
    "pkg/sparsity/masks.py": "from ..config import X\nfrom . import patterns\nkeep = 1\n",
    "pkg/sparsity/patterns.py": "class P:\n    def m(self):\n        import pkg.engine.core\n",
    "pkg/engine/__init__.py": "",
    "pkg/engine/core.py": "from pkg.sparsity.masks import keep\n",
    "pkg/refine/__init__.py": "from pkg.sparsity import masks\n",  # allowed: math -> math
    "scripts/bench.py": "import sys\nfrom pkg.commands.prune import helper\n",
    "scripts/ok.py": "from pkg.engine.core import keep\n",
}


@pytest.fixture
def synthetic(tmp_path) -> Path:
    for rel, text in SYNTHETIC.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def pairs(edges: list[Edge]) -> set[tuple[str, str]]:
    return {(e.source, e.target) for e in edges}


def test_walker_resolves_relative_absolute_and_local_imports(synthetic):
    edges = package_edges(synthetic, "pkg")
    by = {(e.source, e.target): e for e in edges}
    assert set(package_modules(synthetic, "pkg")) >= {"pkg", "pkg.commands", "pkg.commands.run", "pkg.sparsity"}
    # relative imports from a module and from a package's __init__, `from pkg import module`, `import pkg.mod`
    assert {("pkg.c", "pkg.a"), ("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.commands.run", "pkg.plan"),
            ("pkg.commands.run", "pkg.commands.prune"), ("pkg.sparsity.masks", "pkg.config"),
            ("pkg.sparsity.masks", "pkg.sparsity.patterns"), ("pkg.refine", "pkg.sparsity.masks")} <= pairs(edges)
    # `from pkg.commands.prune import helper` names the module, not the function; stdlib is ignored
    assert ("pkg.commands.dsnot", "pkg.commands.prune") in by
    assert not any(e.target in ("os", "typing") for e in edges)
    # function-local (also in a method) and TYPE_CHECKING imports are found but are not load-time
    assert not by[("pkg.commands.dsnot", "pkg.commands.prune")].top_level
    assert not by[("pkg.sparsity.patterns", "pkg.engine.core")].top_level
    assert not by[("pkg.typed", "pkg.typed2")].top_level
    assert by[("pkg.commands.run", "pkg.plan")].top_level
    e = by[("pkg.commands.dsnot", "pkg.commands.prune")]
    assert (e.file, e.line) == ("pkg/commands/dsnot.py", 2)
    assert str(e) == "pkg/commands/dsnot.py:2 -> pkg.commands.prune (inside a function)"


def test_rules_catch_each_violation_of_the_synthetic_package(synthetic):
    edges = package_edges(synthetic, "pkg")
    assert pairs(commands_to_commands(edges, "pkg")) == {("pkg.commands.dsnot", "pkg.commands.prune"),
                                                          ("pkg.commands.run", "pkg.commands.prune")}
    assert pairs(math_to_above(edges, "pkg")) == {("pkg.sparsity.masks", "pkg.config"),
                                                  ("pkg.sparsity.patterns", "pkg.engine.core")}
    found = load_time_cycles(edges)
    assert [pairs(c) for c in found] == [{("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a")}]
    # a lazy import back, or one under TYPE_CHECKING, is not a load-time cycle...
    assert not any(("pkg.lazy2", "pkg.lazy") in pairs(c) or ("pkg.typed2", "pkg.typed") in pairs(c) for c in found)
    # ...but plan <-> commands.run is refused at any level
    assert pairs(between(edges, "pkg.plan", "pkg.commands.run")) == {("pkg.plan", "pkg.commands.run"),
                                                                      ("pkg.commands.run", "pkg.plan")}
    bad = scripts_to_commands(script_edges(synthetic / "scripts", synthetic, "pkg"), "pkg")
    assert [str(e) for e in bad] == ["scripts/bench.py:2 -> pkg.commands.prune"]
    assert report("title", bad) == "title (1):\n  scripts/bench.py:2 -> pkg.commands.prune"
