"""Who launched a pipeline execution, and what it ran on.

:class:`RunContext` holds the ids that tie the stages of one execution together. Each
field is the run tag ``refinery.<field>``; the flow hands the pipeline and Prefect ids
to its stage processes as ``REFINERY_<FIELD>`` environment variables, and DVC sets
its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

PIPELINE_ID_ENV = "REFINERY_PIPELINE_ID"
FLOW_RUN_ID_ENV = "REFINERY_PREFECT_FLOW_RUN_ID"
PIPELINE_TAG = "refinery.pipeline_id"
ROLE_TAG = "refinery.role"  # pipeline | stage | seeds
STAGE_TAG = "refinery.stage"
_PASSED_ON = ("pipeline_id", "prefect_flow_run_id", "prefect_flow_run_name",
              "prefect_flow_run_url")  # the fields the flow's stage processes inherit


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
    """The ``dvc`` process that launched this stage: all stages of one ``dvc repro`` are
    its children, so its pid and start time name the execution."""
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
    prefect_flow_run_id: str | None = None
    prefect_flow_run_name: str | None = None
    prefect_flow_run_url: str | None = None

    @classmethod
    def from_env(cls) -> RunContext:
        """The context of a stage process (set by DVC and by the Prefect flow)."""
        env = os.environ
        given = {key: env.get(f"REFINERY_{key.upper()}") or None for key in _PASSED_ON}
        launcher_id = None if given["pipeline_id"] else _dvc_launcher_id()
        experiment = env.get("DVC_EXP_NAME") or None
        launcher = ("prefect" if given["prefect_flow_run_id"] else "dvc-exp" if experiment
                    else "dvc" if launcher_id else "env" if given["pipeline_id"] else "cli")
        given["pipeline_id"] = (given["pipeline_id"] or launcher_id
                                or f"single-{uuid.uuid4().hex[:12]}")
        return cls(launcher=launcher, dvc_experiment=experiment,
                   dvc_baseline_rev=env.get("DVC_EXP_BASELINE_REV") or None, **given)

    @classmethod
    def for_prefect(cls, flow_run_id: str, name: str | None = None,
                    url: str | None = None) -> RunContext:
        return cls(pipeline_id=f"prefect-{flow_run_id}", launcher="prefect",
                   prefect_flow_run_id=flow_run_id, prefect_flow_run_name=name,
                   prefect_flow_run_url=url)

    def env(self) -> dict[str, str]:
        """Environment for the stage processes of this execution (the flow sets it)."""
        values = asdict(self)
        return {f"REFINERY_{key.upper()}": values[key] for key in _PASSED_ON if values[key]}

    @property
    def orchestrated(self) -> bool:
        """An orchestrator (the flow) owns the parent's status; stages leave it alone."""
        return self.launcher == "prefect"

    def tags(self) -> dict[str, str | None]:
        """The run tags that name this execution (None: unknown, left out of the run)."""
        return {**{f"refinery.{key}": value for key, value in asdict(self).items()},
                "mlflow.source.git.commit": git_commit()}

    def parent_run_name(self) -> str:
        if self.prefect_flow_run_id:
            return f"prefect {self.prefect_flow_run_name or self.prefect_flow_run_id[:8]}"
        if self.dvc_experiment:
            return f"exp {self.dvc_experiment}"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
        return f"{'repro' if self.launcher == 'dvc' else 'pipeline'} {stamp}"
