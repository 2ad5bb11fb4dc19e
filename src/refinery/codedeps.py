"""Which source files a stage's results depend on, read from the imports themselves.

``dvc.yaml`` must list every file whose change can change a stage's outputs,
or DVC keeps stale outputs after that file changes. Lists typed by hand
drift (``data/prepared.py`` was imported by seven stages and a dependency of
none), so the list is derived: the modules a stage's module imports inside
``refinery``, transitively, including imports inside functions (the stages
import heavy libraries lazily), found by reading the source with :mod:`ast`
(nothing is imported or run).

Left out on purpose (:data:`NOT_RESULTS`): modules that only report on a
run (MLflow tracking, lineage records, progress bars), whose changes cannot
change an output, and the wiring (the stage declarations, the adapter
helpers, the plan check that can only refuse), whose effect on a stage shows
in ``dvc.yaml`` itself (command, deps, outs, params), which DVC tracks. A
change there must not retrain every model.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE = "refinery"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # src/
#: Modules (and packages) that observe or wire a run without shaping its outputs.
NOT_RESULTS = ("refinery.tracking", "refinery.lineage", "refinery.progress", "refinery.cli",
               "refinery.__main__", "refinery.pipeline", "refinery.stage", "refinery.plan",
               "refinery.codedeps", "refinery.logged_models")


def module_file(module: str) -> Path | None:
    """The source file of a ``refinery`` module (a package's ``__init__.py``), or None."""
    base = SOURCE_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def not_results(module: str) -> bool:
    """True for a module of :data:`NOT_RESULTS` (or inside one): not a code dependency."""
    return any(module == name or module.startswith(name + ".") or
               module.startswith(name + "_") for name in NOT_RESULTS)


@cache
def direct_imports(module: str) -> frozenset[str]:
    """``refinery`` modules imported anywhere in ``module``'s source (functions included)."""
    path = module_file(module)
    if path is None:
        return frozenset()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                # ``from refinery.x import y``: y may be a module or a name in x
                resolved = name if module_file(name) else name.rpartition(".")[0]
                if module_file(resolved):
                    found.add(resolved)
    return frozenset(found)


def parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(roots: Iterable[str]) -> set[str]:
    """Every ``refinery`` module the roots import, transitively, minus :data:`NOT_RESULTS`."""
    seen: set[str] = set()
    todo = [m for root in roots for m in (*parents(root), root)]
    while todo:
        module = todo.pop()
        if module in seen or not_results(module):
            continue
        seen.add(module)
        todo.extend(m for child in direct_imports(module) for m in (*parents(child), child))
    return seen


def code_deps(roots: Iterable[str], repo: Path) -> list[str]:
    """The closure as repository-relative file paths, sorted (``dvc.yaml``'s form)."""
    files = {module_file(module) for module in closure(roots)}
    return sorted(str(path.relative_to(repo)) for path in files if path is not None)
