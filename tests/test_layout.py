"""The package's shape: training never imports a command, and no two parts import each other.

The import graph is read from the source with ``ast`` (function-level imports included: they
are dependencies too; ``if TYPE_CHECKING:`` blocks excluded), relative imports resolved.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

PACKAGE = "vlm_sweep"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE
CLI = f"{PACKAGE}.cli"
# The old ``python -m vlm_sweep.<command>`` spellings: nothing but a call of the command's main.
COMMAND_SHIMS = {f"{PACKAGE}.generate", f"{PACKAGE}.evaluate", f"{PACKAGE}.export"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py")) if "conf" not in p.relative_to(SRC).parts}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (no import at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The vlm_sweep modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names)
    return {m for m in found if m == PACKAGE or m.startswith(f"{PACKAGE}.")}


@pytest.fixture(scope="module")
def graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) - {name} for name, path in modules.items()}


def _unit(module: str) -> str:
    """The top-level subpackage or module a module belongs to (``vlm_sweep.training.trainer`` -> ``training``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _is_cli(module: str) -> bool:
    return module == CLI or module.startswith(f"{CLI}.") or module in COMMAND_SHIMS


def test_the_graph_sees_the_imports_it_must(graph):
    """Guards the parser itself: known edges (absolute, function-level, ``from pkg import mod``) are found."""
    assert f"{PACKAGE}.inference.export" in graph[f"{PACKAGE}.training.checkpoint"]
    assert f"{PACKAGE}.cli.evaluate" in graph[f"{PACKAGE}.evaluate"]
    assert f"{PACKAGE}.inference.generate" in graph[f"{PACKAGE}.inference.score"]


@pytest.mark.parametrize("part", ["training", "data"])
def test_training_and_data_never_import_a_command(graph, part):
    offenders = {m: sorted(filter(_is_cli, deps)) for m, deps in graph.items()
                 if _unit(m) == part and any(map(_is_cli, deps))}
    assert not offenders, f"{part}/ imports command-line modules: {offenders}"


def test_only_the_command_shims_import_the_cli_package(graph):
    """The library (everything outside cli/) is usable without argparse: only the old ``-m`` spellings lead in."""
    offenders = {m: sorted(filter(_is_cli, deps)) for m, deps in graph.items()
                 if not _is_cli(m) and any(map(_is_cli, deps))}
    assert not offenders, offenders


def _part_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    units: Dict[str, Set[str]] = {}
    for module, deps in graph.items():
        units.setdefault(_unit(module), set()).update(_unit(d) for d in deps if _unit(d) not in ("", _unit(module)))
    units.pop("", None)
    return _cycles(units)


def _describe(cycles: List[List[str]]) -> str:
    return "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycles_between_modules(graph):
    cycles = _cycles(graph)
    assert not cycles, f"import cycles between modules: {_describe(cycles)}"


def test_no_import_cycles_between_top_level_parts(graph):
    cycles = _part_cycles(graph)
    assert not cycles, f"import cycles between vlm_sweep's parts: {_describe(cycles)}"


FAMILY_WORDS = re.compile(r"gemma|qwen|nemotron|siglip|mamba", re.IGNORECASE)
# Where family knowledge belongs: the registry (as data), the tiny builders, and per-data-set modules.
FAMILY_HOMES = ("models/registry.py", "models/tiny/", "data/sets/")


def _code_strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """String constants that are not docstrings."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_generic_module_names_a_model_family():
    """Family knowledge is data in the registry: generic code (loop, data path, loss, CLIs, ...) never
    branches on or spells a family (comments and docstrings may mention one as an example)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(FAMILY_HOMES):
            continue
        tree = ast.parse(path.read_text())
        offenders += [f"{rel}:{node.lineno}: {node.value!r}" for node in _code_strings(tree)
                      if FAMILY_WORDS.search(node.value)]
        offenders += [f"{rel}:{node.lineno}: {node.id}" for node in ast.walk(tree)
                      if isinstance(node, ast.Name) and FAMILY_WORDS.search(node.id)]
    assert not offenders, "generic modules naming a model family:\n" + "\n".join(offenders)


MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def test_no_source_file_or_function_is_too_long_to_read():
    """Files over 400 lines and functions over 80 ask to be split (the house style; issue 11)."""
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
