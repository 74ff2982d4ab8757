"""medvl's packages import downward only, and never in a loop (docs/architecture.md, "Layers").

Every module under src/medvl is parsed with ``ast`` (nothing is imported), so imports inside
functions and ``TYPE_CHECKING`` blocks count like any other: a loop cannot hide in a lazy import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "medvl"  # the package itself: medvl/__init__.py, the public API

# Top to bottom. A package may import any package of a lower layer.
LAYERS: list[set[str]] = [
    {"cli", "serve", "__main__"},  # the apps: command line (also as python -m medvl), HTTP service
    {ROOT},  # medvl/__init__.py: the public API, names re-exported from the packages below
    {"api", "bench", "eval", "explain", "rag", "index", "train", "demo", "report", "predict", "scale"},
    {"embed"},  # batched encoding, shared by eval, rag, index and serve
    {"data", "models", "clinical"},  # records and loaders, model code, clinical file formats
    {"checks", "errors", "io", "progress"},  # the foundation
]

# Imports between packages of the same layer: only these, each one way.
SAME_LAYER: dict[str, set[str]] = {
    "cli": {"serve"},  # `medvl serve` starts the service
    "__main__": {"cli"},  # python -m medvl runs the command line
    "api": {"eval", "explain", "train"},  # path-level entry points: a bottleneck fitted on a dataset path
    "bench": {"eval", "train", "index", "rag", "report"},  # recipes and suites compose training, evaluators, the
    # case index (case retrieval), the knowledge base findings are read with, and the HTML report
    "demo": {"eval", "report", "train"},
    "predict": {"eval"},
    "eval": {"index", "rag"},  # case retrieval scores the index and the RAG drafts
    "rag": {"index"},  # drafts are written from the nearest indexed cases
    "scale": {"index"},  # Ray workers embed batches for the index builder
    "explain": {"eval", "index", "predict"},  # explanations of predictions: probes, nearest cases
    "train": {"eval", "index", "rag"},  # recipes' class order; the report generator's retrieved context
    "models": {"data", "clinical"},  # model code reads records, captions and images (volumes: NIfTI slabs)
    "data": {"clinical"},  # read_image registers the DICOM / NIfTI readers
    "checks": {"errors"},
    "io": {"errors"},
}


def _layer(package: str) -> int:
    for depth, layer in enumerate(LAYERS):
        if package in layer:
            return depth
    raise AssertionError(f"{_dotted(package)} is in no layer: add it to LAYERS in tests/test_layers.py "
                         "and to docs/architecture.md")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under src/medvl."""
    modules = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(module: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(medvl module imported, line) for every import statement in the file, at any depth."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from medvl import data` imports the subpackage, `from medvl.data import Record` the package
            names = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                while name not in modules:  # `medvl.data.record.Record` -> the module medvl.data.record
                    name = name.rpartition(".")[0]
                yield name, node.lineno


def _dotted(package: str) -> str:
    return package if package == ROOT else f"{ROOT}.{package}"


def _package(module: str) -> str:
    """medvl.data.loaders.dicom -> data; medvl.embed -> embed; medvl -> medvl."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _graph() -> dict[str, dict[str, str]]:
    """module -> {imported module: where ("medvl/x.py:12")}, medvl modules only."""
    modules = _modules()
    graph: dict[str, dict[str, str]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for target, line in _imported(module, path, modules):
            if target != module:
                edges.setdefault(target, f"{path.relative_to(SRC)}:{line}")
    return graph


def _package_graph(graph: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    packages: dict[str, dict[str, str]] = {}
    for module, edges in graph.items():
        for target, where in edges.items():
            source, dest = _package(module), _package(target)
            if source != dest:
                packages.setdefault(source, {}).setdefault(dest, where)
    return packages


def _cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
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


def _describe(component: list[str], graph: dict[str, dict[str, str]]) -> str:
    members = set(component)
    return "; ".join(f"{source} -> {target} ({where})" for source in component
                     for target, where in sorted(graph.get(source, {}).items()) if target in members)


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, str]]:
    return _graph()


def test_the_parser_sees_relative_absolute_and_function_level_imports(tmp_path):
    package = tmp_path / "medvl"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .. import errors\n")
    (package / "sub" / "inner.py").write_text("import medvl.errors\n\ndef later():\n    from ..errors import X\n")
    modules = {"medvl": package / "__init__.py", "medvl.errors": package / "errors.py",
               "medvl.sub": package / "sub" / "__init__.py", "medvl.sub.inner": package / "sub" / "inner.py"}
    assert list(_imported("medvl.sub", modules["medvl.sub"], modules)) == [("medvl.errors", 1)]
    assert sorted(_imported("medvl.sub.inner", modules["medvl.sub.inner"], modules)) == [
        ("medvl.errors", 1), ("medvl.errors", 4)]


def test_no_import_cycle_between_packages(graph):
    packages = _package_graph(graph)
    cycles = _cycles(packages)
    assert not cycles, "import cycles between medvl packages: " + " | ".join(
        _describe(component, packages) for component in cycles)


def test_no_import_cycle_between_modules(graph):
    cycles = _cycles(graph)
    assert not cycles, "import cycles between medvl modules: " + " | ".join(
        _describe(component, graph) for component in cycles)


def test_imports_run_downward_only(graph):
    wrong = []
    for source, targets in sorted(_package_graph(graph).items()):
        for target, where in sorted(targets.items()):
            above, below = _layer(source), _layer(target)
            if above > below or (above == below and target not in SAME_LAYER.get(source, set())):
                wrong.append(f"{_dotted(source)} imports {_dotted(target)} ({where})")
    assert not wrong, "imports against the layering in docs/architecture.md:\n" + "\n".join(wrong)


def test_same_layer_rules_are_one_way():
    for source, targets in SAME_LAYER.items():
        for target in targets:
            assert _layer(source) == _layer(target), (source, target)
            assert source not in SAME_LAYER.get(target, set()), (source, target)


def test_the_package_map_names_every_module():
    """docs/architecture.md's package map names each module (by its file's stem), so the map cannot drift from
    the package: a module added without a line there fails here."""
    text = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    unnamed = [name for name, path in _modules().items()
               if path.name != "__init__.py" and path.stem not in text]
    assert not unnamed, f"add these modules to docs/architecture.md's package map: {unnamed}"
