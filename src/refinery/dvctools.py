"""Running DVC from Python: the executable beside this interpreter, and a quiet environment.

Shared by the Prefect flow (:mod:`pipelines.dvc_runner`) and ``refinery seeds``,
so both run the same DVC install as the stages' ``python -m refinery``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC: this interpreter's ``bin`` first, so the stages'
    ``python -m refinery`` is the same install as the flow's, and no telemetry."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def dvc_executable() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")
