"""The one module that talks to MLflow.

Stages never import mlflow: they get a :class:`StageRun` from
:func:`stage_run` and log through it. That keeps tracking policy (where the
store is, how runs nest, how metrics are batched) in one place.

Layout of runs: every pipeline execution is one *parent* run (tag
``refinery.role=pipeline``); every stage that executes is a child run of it.
Stages of one execution find the same parent through a pipeline id: the
``REFINERY_PIPELINE_ID`` environment variable when an orchestrator sets it,
else the id of the ``dvc repro``/``dvc exp run`` process that launched them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = Path("mlflow")
PIPELINE_ID_ENV = "REFINERY_PIPELINE_ID"
ROLE_TAG = "refinery.role"
STAGE_TAG = "refinery.stage"
PIPELINE_TAG = "refinery.pipeline_id"

# Keep MLflow quiet and offline by default; users can override any of these.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def default_tracking_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / DEFAULT_STORE_DIR / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside the default sqlite store; a remote server decides its own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").as_uri()
    return None


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _dvc_launcher_id() -> str | None:
    """Identify the ``dvc`` process that launched this stage, if any.

    ``dvc repro`` runs each stage as a child process; all stages of one repro
    share that ancestor, so its pid and start time name the execution.
    """
    try:
        import psutil

        for proc in psutil.Process().parents():
            try:
                cmd = proc.cmdline()
            except (psutil.AccessDenied, psutil.ZombieProcess):
                continue
            words = [Path(part).name for part in cmd[:3]]
            if "dvc" in words or any(w.startswith("dvc") for w in words[:2]):
                return f"dvc-{proc.pid}-{int(proc.create_time())}"
    except Exception:  # psutil missing or /proc unreadable: no launcher id
        return None
    return None


def pipeline_id() -> str:
    """The id shared by the stages of one pipeline execution."""
    explicit = os.environ.get(PIPELINE_ID_ENV)
    if explicit:
        return explicit
    return _dvc_launcher_id() or f"single-{uuid.uuid4().hex[:12]}"


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tuples stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; raised before a stage starts its work."""


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an HTTP tracking server does not answer its health endpoint."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout_s)
    except requests.RequestException as exc:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({exc.__class__.__name__}). "
            "Start it, point MLFLOW_TRACKING_URI elsewhere, or set tracking.on_unreachable: defer."
        ) from None
    if response.status_code >= 500:
        raise TrackingUnavailable(f"MLflow tracking server {uri} answered {response.status_code}")


@dataclass
class StageRun:
    """Handle a stage logs through; metrics are buffered and sent in batches."""

    run_id: str
    parent_run_id: str | None
    stage: str
    client: Any
    _metrics: list[Any] = field(default_factory=list)
    _last_flush: float = field(default_factory=time.monotonic)
    flush_every_s: float = 15.0

    # -- metrics and params ---------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._metrics.append(Metric(key, float(value), stamp, int(step or 0)))
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Send buffered metrics in batches of at most 1000 (the server's limit)."""
        while self._metrics:
            batch, self._metrics = self._metrics[:1000], self._metrics[1000:]
            self.client.log_batch(self.run_id, metrics=batch)
        self._last_flush = time.monotonic()

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, list | tuple | dict) else str(v))
                 for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # -- artifacts --------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this run MLflow's active run, for APIs (model logging) that need one."""
        import mlflow

        with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
            yield


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri()))
    except Exception:  # created concurrently by another stage
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _find_or_create_parent(client: Any, exp_id: str, pid: str) -> str:
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    tags = {ROLE_TAG: "pipeline", PIPELINE_TAG: pid, "mlflow.runName": f"pipeline {pid}"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["refinery.dvc_experiment"] = exp_name
    run = client.create_run(exp_id, tags=tags, run_name=f"pipeline {pid}")
    return run.info.run_id


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    experiment: str = "refinery",
    tags: Mapping[str, Any] | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow child run of one stage execution and close it with its outcome."""
    uri = tracking_uri()
    check_reachable(uri)
    client = _client()
    exp_id = experiment_id(client, experiment)
    pid = pipeline_id()
    parent = _find_or_create_parent(client, exp_id, pid)
    run_tags = {
        ROLE_TAG: "stage",
        STAGE_TAG: stage,
        PIPELINE_TAG: pid,
        "mlflow.parentRunId": parent,
        "mlflow.runName": stage,
    }
    commit = git_commit()
    if commit:
        run_tags["mlflow.source.git.commit"] = commit
    run_tags.update({k: str(v) for k, v in (tags or {}).items()})
    created = client.create_run(exp_id, tags=run_tags, run_name=stage)
    run = StageRun(run_id=created.info.run_id, parent_run_id=parent, stage=stage, client=client)
    run.log_params(params)
    started = time.monotonic()
    try:
        yield run
    except BaseException as exc:
        with contextlib.suppress(Exception):
            run.flush()
            message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            run.set_tags({"refinery.error": message[:5000]})
            client.set_terminated(run.run_id, status="FAILED")
        raise
    run.log_metrics({"stage_seconds": time.monotonic() - started})
    run.flush()
    client.set_terminated(run.run_id, status="FINISHED")


class NullRun:
    """Stands in for a :class:`StageRun` where nothing is tracked (non-zero DDP ranks)."""

    run_id = ""
    parent_run_id = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        return None

    def flush(self) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        return None

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        return None

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        return None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        yield
