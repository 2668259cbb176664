"""The package's import graph, read from its source with `ast` (nothing is imported): the core knows no benchmark,
server or testbed, and no module reaches itself through imports.

Every `import` and `from ... import` counts, at module level or inside a function (a lazy import still ties two
modules together), except under `if TYPE_CHECKING:` (annotations only, never run). A `from package import name`
is an edge to the submodule `package.name` where there is one, else to the package itself (its __init__)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mllmeraser"
ABOVE_THE_CORE = ("bench", "serve", "testbed")


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package directory `root` (a package is its
    __init__'s name)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST):
    """Every import statement under `node`, at any depth, but none in the body of an `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _imports(child)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (relative imports resolved; other packages left out)."""
    modules = module_names(root)
    package = root.name
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # A relative import counts from the module's package: the module itself where it is a package's __init__.
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.split(".")[0] == package}
                continue
            if node.level:
                stem = base[: len(base) - node.level + 1]
                source = ".".join(stem + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != package:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
        graph[name] = {target for target in targets if target != name and target in modules}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_core_imports_no_benchmark_server_or_testbed():
    graph = import_graph(PACKAGE)
    core = [name for name in graph if name.startswith("mllmeraser.core")]
    assert "mllmeraser.core.eraser" in core and "mllmeraser.core.inputs" in core  # the walk found the core
    upward = sorted((name, target) for name in core for target in graph[name]
                    if target.split(".")[1:2] and target.split(".")[1] in ABOVE_THE_CORE)
    assert upward == []


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "mllmeraser.core.eraser" in graph["mllmeraser.core.solve"]  # edges are found: a fit's solve packs Erasers
    assert cycles(graph) == []


def test_the_frozen_eraser_knows_nothing_of_fitting():
    """The eraser is fitted by the fitter and knows nothing of it (a fit on Eraser tied eraser, fitting and the model
    cache into one cycle)."""
    graph = import_graph(PACKAGE)
    assert not graph["mllmeraser.core.eraser"] & {"mllmeraser.core.collection", "mllmeraser.core.solve",
                                                  "mllmeraser.core.cache", "mllmeraser.core.eraser_fitter"}


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_graph_counts_lazy_imports_and_skips_type_checking_ones(tmp_path):
    """What the two checks above rest on, on a package made here: an import inside a function is an edge (and
    closes a cycle), one under `if TYPE_CHECKING:` is not; relative imports resolve from a module's package, and
    `from . import name` names the submodule."""
    root = _package(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "from __future__ import annotations\nfrom typing import TYPE_CHECKING\nfrom . import b\n"
                     "if TYPE_CHECKING:\n    from ..bench import c\n",
        "core/b.py": "def f():\n    from .a import thing\n    return thing\n",
        "bench/__init__.py": "",
        "bench/c.py": "import pkg.core.a\nfrom ..core import b as other\n",
    })
    graph = import_graph(root)
    assert graph["pkg.core.a"] == {"pkg.core.b"}  # the TYPE_CHECKING import is not an edge
    assert graph["pkg.core.b"] == {"pkg.core.a"}  # the lazy one is
    assert graph["pkg.bench.c"] == {"pkg.core.a", "pkg.core.b"}
    assert cycles(graph) == [["pkg.core.a", "pkg.core.b"]]
    upward = _package(tmp_path / "up", {"__init__.py": "", "core/__init__.py": "", "bench/__init__.py": "",
                                        "bench/prompts.py": "", "core/inputs.py": "from ..bench import prompts\n"})
    assert import_graph(upward)["pkg.core.inputs"] == {"pkg.bench.prompts"}
