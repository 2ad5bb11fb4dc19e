"""Running DVC from Python: the executable beside this interpreter, and a quiet environment.

Shared by the Prefect flow (:mod:`pipelines.dvc_runner`) and ``refinery seeds``,
so both run the same DVC install as the stages' ``python -m refinery``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from refinery import paths


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


def experiment_name(flow_run_name: str | None, flow_run_id: str) -> str:
    """A DVC experiment name (a git ref name) for a Prefect flow run."""
    base = flow_run_name or flow_run_id[:8]
    return "prefect-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in base)


def save_experiment(workspace: Path, name: str, message: str, stages: Sequence[str],
                    env: Mapping[str, str] | None = None) -> str:
    """``dvc exp save``: the workspace as it stands (params, ``dvc.lock``, metrics) as a
    DVC experiment, so ``dvc exp show`` lists a run that DVC did not launch itself.
    Only ``stages`` are committed: a run that stopped early has no later outputs. The
    lock file and the uncached metrics and plots go in even where git does not track them
    yet (``dvc exp show`` reads them from the experiment's commit)."""
    untracked = [arg for path in ("dvc.lock", str(paths.METRICS), str(paths.PLOTS))
                 if (workspace / path).exists() for arg in ("--include-untracked", path)]
    result = subprocess.run([dvc_executable(), "exp", "save", "--force", "--name", name,
                             "--message", message, *untracked, *stages], cwd=workspace,
                            env=tool_env(env), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"dvc exp save {name} failed: {result.stderr.strip()[-2000:]}")
    return name
