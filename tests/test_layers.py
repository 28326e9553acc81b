"""The package's import layers, read from the source with ``ast`` (nothing is imported).

* Layer rule: nothing under ``pathflow.models``, ``pathflow.data`` or ``pathflow.slide``
  imports ``pathflow.train``, ``pathflow.extract``, ``pathflow.evaluate`` or ``pathflow.cli``,
  and ``pathflow.jobs`` does not import ``pathflow.tiling`` (it gets the manifest schema from
  a neutral place). Imports inside functions count: a lazy upward import is still an upward
  arrow. Imports under ``if TYPE_CHECKING:`` do not (they never run).
* No import cycle among the package's modules. Imports inside functions count here too: the
  circles a newcomer has to hold in their head (``a`` calls into ``b``, which calls back into
  ``a``) are made of lazy imports as often as of module-level ones.

Imports are resolved as Python does: relative imports against the module's package, and
``from pkg import name`` to the submodule ``pkg.name`` when there is one (else to ``pkg``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "pathflow"

#: Lower layer -> packages it must never import (prefixes: the package and its submodules).
FORBIDDEN = {
    "pathflow.models": ("pathflow.train", "pathflow.extract", "pathflow.evaluate", "pathflow.cli"),
    "pathflow.data": ("pathflow.train", "pathflow.extract", "pathflow.evaluate", "pathflow.cli"),
    "pathflow.slide": ("pathflow.train", "pathflow.extract", "pathflow.evaluate", "pathflow.cli"),
    "pathflow.jobs": ("pathflow.tiling",),
}

#: Import cycles still being removed by other parts of issue 20 (each: the modules of one
#: strongly connected component). To be emptied; a cycle that is gone must be removed here.
CYCLES_BEING_REMOVED: frozenset[frozenset[str]] = frozenset()


@dataclass(frozen=True)
class Import:
    """One import of ``source`` (a module name) resolving to ``target``."""

    source: str
    target: str
    line: int
    lazy: bool  # inside a function body


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file for every ``.py`` under ``root`` (a package folder);
    extension modules (``.so``, ``.pyi``) are named too, so ``from pkg import _core`` resolves."""
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix not in (".py", ".pyi", ".so") or "__pycache__" in p.parts:
            continue
        parts = [*p.relative_to(root.parent).parts[:-1], p.name.split(".")[0]]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if p.suffix == ".py" or name not in out:
            out[name] = p
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _import_nodes(
    body: list[ast.stmt], lazy: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Import statements of ``body`` with whether they sit in a function (skipping the
    ``if TYPE_CHECKING:`` branch, keeping its ``else``)."""
    for node in body:
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from _import_nodes(node.orelse, lazy)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _import_nodes(node.body, True)
        else:  # class bodies, if/try/with/for blocks: run when their statement runs
            for name in ("body", "orelse", "finalbody"):
                sub = getattr(node, name, None)
                if isinstance(sub, list):
                    yield from _import_nodes(sub, lazy)
            for clause in [*getattr(node, "handlers", []), *getattr(node, "cases", [])]:
                yield from _import_nodes(clause.body, lazy)


def _targets(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: dict[str, Path]
) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        pkg = ".".join([*base, *([node.module] if node.module else [])])
    else:
        pkg = node.module or ""
    return [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in known else pkg for a in node.names]


def package_imports(root: Path) -> list[Import]:
    """Every import between modules of the package under ``root``."""
    known = module_names(root)
    out: list[Import] = []
    for name, path in known.items():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, lazy in _import_nodes(tree.body):
            for target in _targets(name, path.name == "__init__.py", node, known):
                if target in known and target != name:
                    out.append(Import(name, target, node.lineno, lazy))
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_violations(imports: list[Import]) -> list[str]:
    found = {
        f"{i.source} (line {i.line}{', in a function' if i.lazy else ''}) imports {i.target}"
        for i in imports
        for low, banned in FORBIDDEN.items()
        if _under(i.source, low) and any(_under(i.target, b) for b in banned)
    }
    return sorted(found)


def import_cycles(imports: list[Import]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.source, set()).add(i.target)
        graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def _describe(cycle: frozenset[str], imports: list[Import]) -> str:
    arrows = sorted(
        {
            f"{i.source}:{i.line} -> {i.target}"
            for i in imports
            if i.source in cycle and i.target in cycle
        }
    )
    return f"{{{', '.join(sorted(cycle))}}} via " + "; ".join(arrows)


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return package_imports(PACKAGE)


def test_lower_layers_import_nothing_above_them(imports: list[Import]) -> None:
    assert layer_violations(imports) == []


def test_no_import_cycles(imports: list[Import]) -> None:
    cycles = import_cycles(imports)
    new = [_describe(c, imports) for c in cycles if c not in CYCLES_BEING_REMOVED]
    gone = [sorted(c) for c in CYCLES_BEING_REMOVED if c not in cycles]
    assert new == [], "import cycles:\n" + "\n".join(new)
    assert gone == [], f"no longer cycles, remove them from CYCLES_BEING_REMOVED: {gone}"


def test_models_own_backbones_and_weights(imports: list[Import]) -> None:
    """extract, evaluate and models get backbones and weights from pathflow.models, and the
    old train paths are re-exports of it (train -> models, never the reverse)."""
    old = ("pathflow.train.backbones", "pathflow.train.export")
    users = [
        f"{i.source}:{i.line} -> {i.target}"
        for i in imports
        if i.target in old and not _under(i.source, "pathflow.train")
    ]
    assert users == []
    reexports = {i.source: i.target for i in imports if i.source in old}
    assert reexports == {
        "pathflow.train.backbones": "pathflow.models.backbones",
        "pathflow.train.export": "pathflow.models.weights",
    }


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


def test_checker_sees_planted_cycles_and_upward_arrows(tmp_path: Path) -> None:
    """The reader itself, on a planted package: relative and ``from pkg import submodule``
    imports resolve, function-level imports count, ``TYPE_CHECKING`` imports do not."""
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/_ext.pyi": "",
            "pkg/a.py": "from . import b\nfrom pkg import _ext\n",
            "pkg/b.py": "def f():\n    from .sub.c import x\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
                "else:\n    import os\ntry:\n    from ..a import y\nexcept ImportError:\n"
                "    pass\nx = y = 1\n"
            ),
            "pkg/d.py": "from pkg.sub import c\nclass K:\n    import pkg.e as e\n",
            "pkg/e.py": "",
        },
    )
    imports = package_imports(root)
    edges = {(i.source, i.target, i.lazy) for i in imports}
    assert edges == {
        ("pkg.a", "pkg.b", False),
        ("pkg.a", "pkg._ext", False),
        ("pkg.b", "pkg.sub.c", True),
        ("pkg.sub.c", "pkg.a", False),
        ("pkg.d", "pkg.sub.c", False),
        ("pkg.d", "pkg.e", False),
    }
    assert import_cycles(imports) == [frozenset({"pkg.a", "pkg.b", "pkg.sub.c"})]
    upward = [Import("pathflow.models.hipt", "pathflow.train.export", 91, True)]
    assert layer_violations(upward) == [
        "pathflow.models.hipt (line 91, in a function) imports pathflow.train.export"
    ]
