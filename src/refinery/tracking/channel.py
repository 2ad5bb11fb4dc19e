"""Where records go: the tracking server, or the local spool.

The spool (``mlflow/spool/``, git-ignored) is a real MLflow store (sqlite + files), so
logging behaves as against the server and ``mlflow ui`` can browse it. What a replay
copies, and when it waits: mlflow/README.md ("When the server is unreachable").
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from refinery import lineage
from refinery.errors import TrackingError
from refinery.params import flatten
from refinery.tracking.context import PIPELINE_TAG, ROLE_TAG

log = logging.getLogger(__name__)

# Keep MLflow quiet and offline by default. A stage start checks /health itself (fail
# fast); mid-stage, MLflow's own retries (2+4+8+16+32 s) ride out a server restart,
# not its default ~4 minutes per call. Users can override any of these.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

OnUnreachable = Literal["fail", "defer"]
DEFERRED_TAG = "refinery.deferred"  # on a run logged to the spool
SPOOL_ENV = "REFINERY_TRACKING_SPOOL"
WRITERS_LOCK = ".writers.lock"  # in the spool: writers share it, a replay takes it alone
SPOOL_RUN_TAG = "refinery.spool_run"  # on a replayed server run: its id in the spool
_NOT_COPIED = {"mlflow.parentRunId"}


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


def tag_items(tags: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]


@dataclass
class ReplayReport:
    """What a replay sent: spool run id -> server run id, and what it had to skip."""

    replayed: dict[str, str] = field(default_factory=dict)
    busy: bool = False  # another process was writing to the spool: nothing replayed yet
    models_not_replayed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        busy = "; another process is writing to the spool (left for later)" if self.busy else ""
        models = ", ".join(self.models_not_replayed)
        return (f"{len(self.replayed)} run(s) replayed{busy}"
                + (f"; model versions left in the spool store: {models}" if models else ""))


class Channel:
    """Records go through :attr:`client`: an ``MlflowClient`` on the server, or on the
    spool when ``live`` is False. The ``PENDING`` file beside the spool says there is
    something to replay, without opening its database."""

    def __init__(self, uri: str | None = None, root: Path | None = None) -> None:
        root = root or store_root()
        self.uri = uri or tracking_uri(root)
        self.spool_dir = Path(os.environ.get(SPOOL_ENV) or root / "mlflow" / "spool").resolve()
        self.spool_uri = f"sqlite:///{self.spool_dir / 'spool.db'}"
        self.pending = self.spool_dir / "PENDING"
        self.live = True
        self._experiments: dict[str, str] = {}

    @classmethod
    def open(cls, mode: OnUnreachable, what: str, uri: str | None = None,
             root: Path | None = None) -> Channel:
        """Check the server first: fail fast (``fail``) or go to the spool (``defer``)."""
        channel = cls(uri, root)
        reason = unreachable(channel.uri)
        if reason and mode == "fail":
            raise TrackingUnavailable(
                f"{reason}; {what} did not start. Start the server, point MLFLOW_TRACKING_URI "
                "at a live one, or set tracking.on_unreachable: defer in params.yaml to run "
                "now and send the records later (refinery sync-tracking).")
        if reason:
            log.warning("%s; %s runs anyway and spools its records in %s "
                        "(tracking.on_unreachable: defer)", reason, what, channel.spool_dir)
            channel.live = False
        channel.point_mlflow()
        if channel.live and channel.pending.exists():
            try:
                log.info("tracking spool: %s", channel.replay())
            except Exception as exc:
                log.warning("could not replay the tracking spool yet: %s", exc)
        return channel

    @property
    def target(self) -> str:
        """Where this channel's records go: the server's URI, or the spool's."""
        return self.uri if self.live else self.spool_uri

    def point_mlflow(self) -> None:
        """Point MLflow's global URIs at :attr:`target`, so stage code that calls MLflow
        directly (model logging, the registry) follows the same policy."""
        import mlflow

        saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.target)
        mlflow.set_registry_uri(self.target)
        # MLflow exports these to the environment too; keep the user's configuration there
        # (later channels and child processes must still see the real server, not a spool).
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    @cached_property
    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        if self.target.startswith("sqlite:///"):
            Path(self.target.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if not self.live:  # held while this process may write to the spool (see replay)
            self.pending.touch()
            self._writing = open(self.spool_dir / WRITERS_LOCK, "a+")  # noqa: SIM115
            fcntl.lockf(self._writing, fcntl.LOCK_SH)
        return MlflowClient(tracking_uri=self.target)

    def experiment(self, name: str) -> str:
        """The experiment's id in :attr:`target`, created if new; tagged as model training,
        not GenAI (an experiment made before the tag too)."""
        if name not in self._experiments:
            if self.client.get_experiment_by_name(name) is None:
                try:
                    self.client.create_experiment(name, artifact_location(self.target),
                                                  tags=EXPERIMENT_KIND)
                except Exception:  # created concurrently by another stage, or a real error
                    if self.client.get_experiment_by_name(name) is None:
                        raise
            found = self.client.get_experiment_by_name(name)
            for key, value in EXPERIMENT_KIND.items():
                if found.tags.get(key) != value:
                    self.client.set_experiment_tag(found.experiment_id, key, value)
            self._experiments[name] = found.experiment_id
        return self._experiments[name]

    def create_run(self, experiment: str, tags: Mapping[str, Any], run_name: str,
                   params: Mapping[str, Any]) -> str:
        """A new run with ``params`` (flattened), the tags that have a value, and MLflow's
        own source tags (user, entry point, git), as its fluent ``start_run`` would add."""
        from mlflow.entities import Param
        from mlflow.tracking.context.registry import resolve_tags

        if not self.live:
            tags = {**tags, DEFERRED_TAG: "true"}
        run_id = self.client.create_run(self.experiment(experiment), run_name=run_name,
                                        tags=resolve_tags({k: str(v) for k, v in tags.items()
                                                           if v})).info.run_id
        self.client.log_batch(run_id, params=[  # lists as JSON, so they read as in params.yaml
            Param(k, json.dumps(v) if isinstance(v, list | tuple | dict) else str(v))
            for k, v in flatten(params).items()])
        return run_id

    def url(self, experiment: str, run_id: str) -> str | None:
        """The run's page in the server's UI (none for a local store or a spooled run)."""
        live = self.live and not run_id.startswith("spool:")
        return run_url(self.experiment(experiment), run_id, self.uri) if live else None

    def find(self, experiment: str, tags: Mapping[str, str]) -> str | None:
        """The id of a run of ``experiment`` that has these tags, if there is one."""
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        found = self.client.search_runs([self.experiment(experiment)], query, max_results=1)
        return found[0].info.run_id if found else None

    def parent(self, experiment: str, pid: str, tags: Mapping[str, Any], run_name: str,
               params: Mapping[str, Any] | None = None) -> str:
        """Find the parent run of pipeline execution ``pid``, or create it (with the full
        ``params``): the stages of one execution, and spool replay, share it."""
        key = {PIPELINE_TAG: pid, ROLE_TAG: "pipeline"}
        if found := self.find(experiment, key):
            return found
        return self.create_run(experiment, {**tags, **key}, run_name, params or {})

    def resolve(self, record: lineage.Lineage) -> str:
        """The server run id behind a lineage record (looked up if it was deferred)."""
        found = record.run_id or (self.live and record.spool_run_id and self.find(
            record.experiment, {SPOOL_RUN_TAG: record.spool_run_id}))
        return found or f"spool:{record.spool_run_id}"

    def replay(self) -> ReplayReport:
        """Copy every spooled run to the server (the channel is live), then drop it.

        Runs spooled by several stages (or processes) of one execution land under
        the one server parent of their pipeline (:meth:`parent`). Stage runs go
        first, so that the parents' tags can name their server ids. While another
        process writes to the spool (it holds a POSIX read lock, which the kernel
        drops when that process ends, even killed), nothing is replayed: a later
        replay sends it all. This process's own lock never blocks it: a replay
        runs between our own writes, never during one.
        """
        from mlflow.tracking import MlflowClient

        report = ReplayReport()
        spool = MlflowClient(tracking_uri=self.spool_uri, registry_uri=self.spool_uri)
        with open(self.spool_dir / WRITERS_LOCK, "a+") as lock:
            try:  # one replay at a time, and no other writer; closing releases it
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                report.busy = True
                return report
            names = {e.experiment_id: e.name for e in spool.search_experiments()}
            runs = spool.search_runs(list(names), max_results=50_000,
                                     order_by=["attributes.start_time ASC"])
            for run in sorted(runs, key=lambda r: r.data.tags.get(ROLE_TAG) == "pipeline"):
                spool_id = run.info.run_id
                target = report.replayed[spool_id] = self._copy(
                    spool, run, names[run.info.experiment_id])
                for version in spool.search_model_versions(f"run_id = '{spool_id}'"):
                    report.models_not_replayed.append(f"{version.name} v{version.version}")
                spool.delete_run(spool_id)
                local = Path(run.info.artifact_uri.removeprefix("file://")).parent
                if local.is_dir() and self.spool_dir in local.parents:
                    shutil.rmtree(local, ignore_errors=True)
                log.info("replayed spooled run %s -> %s", spool_id, target)
            if not spool.search_runs(list(names), max_results=1):
                self.pending.unlink(missing_ok=True)
        return report

    def _copy(self, spool: Any, run: Any, experiment: str) -> str:
        """Copy one spooled run to the server: a parent run into its pipeline's parent, a
        stage run as a new child of it (or into the copy an interrupted replay made)."""
        from mlflow.entities import Param, RunTag

        spool_id, remote = run.info.run_id, self.client
        tags = {k: v for k, v in run.data.tags.items() if k not in _NOT_COPIED}
        for key, value in list(tags.items()):  # a parent's stage runs named offline: spool:<id>
            ref = value.removeprefix("spool:")
            if ref != value:  # replayed just now (stage runs go first), or by an earlier replay
                tags[key] = self.find(experiment, {SPOOL_RUN_TAG: ref}) or value
        pid = tags[PIPELINE_TAG]
        if tags.get(ROLE_TAG) == "pipeline":
            target = self.parent(experiment, pid, tags, run.info.run_name)
        else:
            tags[SPOOL_RUN_TAG] = spool_id
            tags["mlflow.parentRunId"] = self.parent(experiment, pid, {}, f"pipeline {pid}")
            target = self.find(experiment, {SPOOL_RUN_TAG: spool_id}) or remote.create_run(
                self.experiment(experiment), start_time=run.info.start_time, tags=tags,
                run_name=run.info.run_name).info.run_id
        existing = remote.get_run(target).data.params  # a found parent has its params already
        # One batch per kind; MLflow's client splits them to the server's limits.
        remote.log_batch(target, metrics=[m for key in run.data.metrics
                                          for m in spool.get_metric_history(spool_id, key)],
                         params=[Param(k, v) for k, v in run.data.params.items()
                                 if k not in existing],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        if spool.list_artifacts(spool_id):
            with tempfile.TemporaryDirectory(prefix="refinery-replay-") as tmp:
                remote.log_artifacts(target, spool.download_artifacts(spool_id, "", tmp))
        if run.info.status in ("FINISHED", "FAILED", "KILLED"):  # a killed writer's: RUNNING
            remote.set_terminated(target, status=run.info.status, end_time=run.info.end_time)
        return target


def sync_spool(uri: str | None = None, root: Path | None = None) -> ReplayReport:
    """Replay the spool now; raise :class:`TrackingUnavailable` if the server is still down."""
    channel = Channel(uri, root)
    if not channel.pending.exists():
        return ReplayReport()
    if reason := unreachable(channel.uri):
        raise TrackingUnavailable(reason)
    return channel.replay()
