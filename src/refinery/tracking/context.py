"""Who launched a pipeline execution, and what it ran on.

:class:`RunContext`: the ids that tie the stages of one pipeline execution
together (set by DVC and by the Prefect flow in the stage processes'
environment), and the tags that name them on its runs; the git commit and the
``dvc.lock`` hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

PIPELINE_ID_ENV = "REFINERY_PIPELINE_ID"
FLOW_RUN_ID_ENV = "REFINERY_PREFECT_FLOW_RUN_ID"
FLOW_RUN_NAME_ENV = "REFINERY_PREFECT_FLOW_RUN_NAME"
FLOW_RUN_URL_ENV = "REFINERY_PREFECT_FLOW_RUN_URL"
PIPELINE_TAG = "refinery.pipeline_id"
ROLE_TAG = "refinery.role"  # pipeline | stage | seeds
STAGE_TAG = "refinery.stage"


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def dvc_lock_md5(workspace: Path | None = None) -> str | None:
    try:
        return hashlib.md5((workspace or Path(".")).joinpath("dvc.lock").read_bytes()).hexdigest()
    except OSError:
        return None


def _dvc_launcher_id() -> str | None:
    """Identify the ``dvc`` process that launched this stage, if any.

    ``dvc repro`` runs each stage as a child process; all stages of one repro
    share that ancestor, so its pid and start time name the execution.
    """
    import psutil

    try:
        for proc in psutil.Process().parents():
            with contextlib.suppress(psutil.AccessDenied, psutil.ZombieProcess):
                words = [Path(part).name for part in proc.cmdline()[:3]]
                if "dvc" in words or any(w.startswith("dvc") for w in words[:2]):
                    return f"dvc-{proc.pid}-{int(proc.create_time())}"
    except psutil.Error:  # /proc unreadable, or an ancestor gone: no launcher id
        return None
    return None


@dataclass(frozen=True)
class RunContext:
    """Who launched this pipeline execution, and the ids that name it."""

    pipeline_id: str
    launcher: str  # prefect | dvc-exp | dvc | env | cli
    dvc_experiment: str | None = None
    dvc_baseline_rev: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    flow_run_url: str | None = None

    @classmethod
    def from_env(cls) -> RunContext:
        """The context of a stage process (set by DVC and by the Prefect flow)."""
        env = os.environ
        explicit = env.get(PIPELINE_ID_ENV)
        launcher_id = None if explicit else _dvc_launcher_id()
        experiment = env.get("DVC_EXP_NAME") or None
        flow_run = env.get(FLOW_RUN_ID_ENV) or None
        launcher = ("prefect" if flow_run else "dvc-exp" if experiment else
                    "dvc" if launcher_id else "env" if explicit else "cli")
        return cls(
            pipeline_id=explicit or launcher_id or f"single-{uuid.uuid4().hex[:12]}",
            launcher=launcher,
            dvc_experiment=experiment,
            dvc_baseline_rev=env.get("DVC_EXP_BASELINE_REV") or None,
            flow_run_id=flow_run,
            flow_run_name=env.get(FLOW_RUN_NAME_ENV) or None,
            flow_run_url=env.get(FLOW_RUN_URL_ENV) or None,
        )

    @classmethod
    def for_prefect(cls, flow_run_id: str, name: str | None = None,
                    url: str | None = None) -> RunContext:
        return cls(pipeline_id=f"prefect-{flow_run_id}", launcher="prefect",
                   flow_run_id=flow_run_id, flow_run_name=name, flow_run_url=url)

    def env(self) -> dict[str, str]:
        """Environment for the stage processes of this execution (the flow sets it)."""
        values = {PIPELINE_ID_ENV: self.pipeline_id, FLOW_RUN_ID_ENV: self.flow_run_id,
                  FLOW_RUN_NAME_ENV: self.flow_run_name, FLOW_RUN_URL_ENV: self.flow_run_url}
        return {k: v for k, v in values.items() if v}

    @property
    def orchestrated(self) -> bool:
        """An orchestrator (the flow) owns the parent's status; stages leave it alone."""
        return self.launcher == "prefect"

    def tags(self) -> dict[str, str | None]:
        """The run tags that name this execution (None: unknown, left out of the run)."""
        return {PIPELINE_TAG: self.pipeline_id, "refinery.launcher": self.launcher,
                "refinery.dvc_experiment": self.dvc_experiment,
                "refinery.dvc_baseline_rev": self.dvc_baseline_rev,
                "refinery.prefect_flow_run_id": self.flow_run_id,
                "refinery.prefect_flow_run_name": self.flow_run_name,
                "refinery.prefect_flow_run_url": self.flow_run_url,
                "mlflow.source.git.commit": git_commit()}

    def parent_run_name(self) -> str:
        if self.flow_run_id:
            return f"prefect {self.flow_run_name or self.flow_run_id[:8]}"
        if self.dvc_experiment:
            return f"exp {self.dvc_experiment}"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
        return f"{'repro' if self.launcher == 'dvc' else 'pipeline'} {stamp}"
