"""The tracking layer is one package that depends on nothing that depends on it."""

from __future__ import annotations

from refinery import codedeps

PACKAGE = "refinery.tracking"
MODULES = ["refinery.tracking", "refinery.tracking.context", "refinery.tracking.channel",
           "refinery.tracking.runs"]


def _reach(start: str) -> set[str]:
    """Every refinery module ``start`` imports, transitively (function-level imports too)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for name in codedeps.direct_imports(todo.pop()) | set(codedeps.parents(start)):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_no_import_cycle_through_the_tracking_package() -> None:
    for module in MODULES:
        assert codedeps.module_file(module) is not None, module
        outside = {m for m in _reach(module) if not m.startswith(PACKAGE)}
        back = {m for m in outside if any(d.startswith(PACKAGE) for d in
                                          codedeps.direct_imports(m))}
        assert not back, f"{module} reaches {sorted(back)}, which import the tracking package"


def test_the_cycle_check_sees_function_level_imports() -> None:
    """Negative control: stage.py imports tracking inside a function, and tracking must
    not reach it (the old layout did, through refinery.pipeline)."""
    assert "refinery.tracking" in codedeps.direct_imports("refinery.stage")
    assert "refinery.stage" not in _reach("refinery.tracking.runs")
    assert "refinery.tracking" in _reach("refinery.pipeline")
