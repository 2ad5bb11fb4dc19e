"""Read the stage list from ``dvc.yaml``: the one list the flow, DVC and the CLI share.

The flow never keeps its own copy of the stages; it asks this module, so a
stage added to (or reordered in) ``dvc.yaml`` is picked up by Prefect with no
edit here. ``tests/test_stage_list.py`` checks it against
``refinery.pipeline.STAGES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS_FILE = "params.yaml"


class DvcFileError(ValueError):
    """``dvc.yaml`` uses something the flow cannot map to one task per stage."""


@dataclass(frozen=True)
class DvcStage:
    name: str
    cmd: str
    params: tuple[str, ...]  # keys of params.yaml; other files as "file:key"
    outs: tuple[str, ...]


def _entries(items: list[Any] | None) -> list[str]:
    """``["a", {"b": {...}}]`` -> ``["a", "b"]`` (DVC's list-of-str-or-mapping form)."""
    names: list[str] = []
    for item in items or []:
        names.extend([item] if isinstance(item, str) else list(item))
    return names


def _params(items: list[Any] | None) -> tuple[str, ...]:
    keys: list[str] = []
    for item in items or []:
        if isinstance(item, str):
            keys.append(item)
            continue
        for file, file_keys in item.items():
            prefix = "" if file == DEFAULT_PARAMS_FILE else f"{file}:"
            keys.extend(f"{prefix}{key}" for key in (file_keys or []))
    return tuple(keys)


def read_stages(dvc_yaml: Path) -> list[DvcStage]:
    """The stages of ``dvc.yaml`` in file order (DVC's order for a linear pipeline)."""
    data = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}
    stages: list[DvcStage] = []
    for name, body in (data.get("stages") or {}).items():
        if "foreach" in body or "matrix" in body:
            raise DvcFileError(f"{dvc_yaml}: stage '{name}' uses foreach/matrix; the flow "
                               "runs one task per plain stage")
        cmd = body.get("cmd")
        if isinstance(cmd, list):
            cmd = " && ".join(cmd)
        if not cmd:
            raise DvcFileError(f"{dvc_yaml}: stage '{name}' has no cmd")
        outs = _entries(body.get("outs")) + _entries(body.get("metrics")) + _entries(
            body.get("plots"))
        stages.append(DvcStage(name, cmd, _params(body.get("params")), tuple(outs)))
    return stages


def plan(dvc_yaml: Path, stop_after: str | None = None) -> list[DvcStage]:
    """The stages to run, in order, up to and including ``stop_after``."""
    stages = read_stages(dvc_yaml)
    if stop_after is None:
        return stages
    names = [stage.name for stage in stages]
    if stop_after not in names:
        raise DvcFileError(f"stop_after: unknown stage '{stop_after}' (expected one of: "
                           + ", ".join(names) + ")")
    return stages[: names.index(stop_after) + 1]
