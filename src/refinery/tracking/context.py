"""Where records go, who launched the execution, and whether the server answers.

The store's location (a repository's ``mlflow/``, or ``MLFLOW_TRACKING_URI``),
the UI address for links, the git commit and ``dvc.lock`` hash, the health
check behind ``tracking.on_unreachable``, and :class:`RunContext`: the ids that
tie the stages of one pipeline execution together (set by DVC and by the
Prefect flow in the stage processes' environment).
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
from urllib.parse import urlsplit, urlunsplit

from refinery.errors import TrackingError

PIPELINE_ID_ENV = "REFINERY_PIPELINE_ID"
FLOW_RUN_ID_ENV = "REFINERY_PREFECT_FLOW_RUN_ID"
FLOW_RUN_NAME_ENV = "REFINERY_PREFECT_FLOW_RUN_NAME"
FLOW_RUN_URL_ENV = "REFINERY_PREFECT_FLOW_RUN_URL"
PIPELINE_TAG = "refinery.pipeline_id"
ROLE_TAG = "refinery.role"  # pipeline | stage | seeds
STAGE_TAG = "refinery.stage"
DEFERRED_TAG = "refinery.deferred"  # on a run logged to the spool

# Keep MLflow quiet and offline by default. A stage start checks /health itself (fail
# fast); mid-stage, MLflow's own retries (2+4+8+16+32 s) ride out a server restart,
# not its default ~4 minutes per call. Users can override any of these.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class TrackingUnavailable(TrackingError):
    """The tracking server cannot be reached and the params say to fail fast."""


def store_root() -> Path:
    """The repository whose ``mlflow/`` holds the default store and the spool: for queued
    and ``--temp`` experiments (a copy under ``.dvc/tmp/exps``) DVC's ``DVC_ROOT``."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    default = (root or store_root()).resolve() / "mlflow" / "mlflow.db"
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default}"


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a local sqlite store; a remote server decides its own."""
    db = uri.removeprefix("sqlite:///")
    return (Path(db).parent / "artifacts").as_uri() if db != uri else None


def ui_base(uri: str | None = None) -> str | None:
    """The MLflow UI address of an HTTP tracking URI, without credentials."""
    parts = urlsplit(uri or tracking_uri())
    if parts.scheme not in ("http", "https"):
        return None
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or ""
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


# MLflow 3.17's UI opens on its GenAI view in a fresh browser; this query opens the
# training view (runs, datasets, models) instead (../shared/notes/stack-notes.md).
TRAINING_VIEW = "?workflowType=machine_learning"
# The experiment tag clients read for the kind of experiment (the UI's switch ignores it).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def run_url(experiment_id: str, run_id: str, uri: str | None = None) -> str | None:
    base = ui_base(uri)
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{TRAINING_VIEW}" if base else None


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


def unreachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an HTTP tracking server does not answer ``/health``; None if it does (or if
    ``uri`` is a local store). One request: MLflow's own client would retry for minutes."""
    base = ui_base(uri)
    if base is None:
        return None
    import requests

    try:
        status = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).status_code
    except requests.RequestException as exc:
        return f"MLflow tracking server {base} is unreachable ({exc.__class__.__name__})"
    return f"MLflow tracking server {base} answered HTTP {status}" if status >= 500 else None


def _dvc_launcher_id() -> str | None:
    """Identify the ``dvc`` process that launched this stage, if any.

    ``dvc repro`` runs each stage as a child process; all stages of one repro
    share that ancestor, so its pid and start time name the execution.
    """
    try:
        import psutil

        for proc in psutil.Process().parents():
            with contextlib.suppress(psutil.AccessDenied, psutil.ZombieProcess):
                words = [Path(part).name for part in proc.cmdline()[:3]]
                if "dvc" in words or any(w.startswith("dvc") for w in words[:2]):
                    return f"dvc-{proc.pid}-{int(proc.create_time())}"
    except Exception:  # psutil missing or /proc unreadable: no launcher id
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

    def tags(self) -> dict[str, str]:
        tags = {PIPELINE_TAG: self.pipeline_id, "refinery.launcher": self.launcher,
                "refinery.dvc_experiment": self.dvc_experiment,
                "refinery.dvc_baseline_rev": self.dvc_baseline_rev,
                "refinery.prefect_flow_run_id": self.flow_run_id,
                "refinery.prefect_flow_run_name": self.flow_run_name,
                "refinery.prefect_flow_run_url": self.flow_run_url,
                "mlflow.source.git.commit": git_commit()}
        return {k: v for k, v in tags.items() if v}

    def parent_run_name(self) -> str:
        if self.flow_run_id:
            return f"prefect {self.flow_run_name or self.flow_run_id[:8]}"
        if self.dvc_experiment:
            return f"exp {self.dvc_experiment}"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
        return f"{'repro' if self.launcher == 'dvc' else 'pipeline'} {stamp}"
