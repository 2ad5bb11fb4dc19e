"""The local spool: what a stage would have sent to an unreachable tracking server.

With ``tracking.on_unreachable: defer`` a stage keeps working when the server
is down, at its start or in its middle. Everything it logs then goes to a
local MLflow store (sqlite + files) under ``mlflow/spool/``, git-ignored. Using
a real MLflow store as the spool, rather than a private journal, means every
logging call behaves exactly as it would against the server (artifacts are
copied at log time, so later workspace changes cannot alter them) and the
spool can be browsed with ``mlflow ui`` while it waits.

:func:`Spool.replay` copies the spooled runs to the server: params, tags,
full metric histories, artifacts and final status. A spooled run is either a
run created offline (replayed as a new server run tagged
``refinery.spool_run=<spool id>``, under the parent of its pipeline id) or a
*shadow* of a server run that lost its server mid-stage (tag
``refinery.spool_target``; replayed into that run). Replay is triggered by
the next stage that finds the server up, by ``refinery sync-tracking``, and
by the Prefect flow at its end.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPOOL_ENV = "REFINERY_TRACKING_SPOOL"
SPOOL_RUN_TAG = "refinery.spool_run"  # on a replayed server run: its id in the spool
SPOOL_TARGET_TAG = "refinery.spool_target"  # on a spool shadow: the server run it completes
PROCESS_TAG = "refinery.process"  # host:pid:start of the process that wrote a spool run
_TERMINAL = {"FINISHED", "FAILED", "KILLED"}
_NOT_COPIED = {"mlflow.parentRunId", SPOOL_TARGET_TAG}


def process_id() -> str:
    """``host:pid:start``: identifies a live writer even if pids are reused."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{int(me.create_time())}"


def _writer_alive(process: str | None) -> bool:
    """Is another live process still writing this spool run? (Ours is not "another":
    a replay runs between our own writes, never during one.)"""
    if not process or process == process_id():
        return False
    import psutil

    parts = process.rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, pid, started = parts
    if host != socket.gethostname():
        return False  # another machine's spool copy: nothing we can check, treat as done
    try:
        proc = psutil.Process(int(pid))
        return int(proc.create_time()) == int(started)
    except (psutil.Error, ValueError):
        return False


@dataclass
class ReplayReport:
    """What a replay sent: spool run id -> server run id, and what it had to skip."""

    replayed: dict[str, str] = field(default_factory=dict)
    skipped_live: list[str] = field(default_factory=list)
    models_not_replayed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{len(self.replayed)} run(s) replayed"]
        if self.skipped_live:
            parts.append(f"{len(self.skipped_live)} still being written (left for later)")
        if self.models_not_replayed:
            parts.append("model versions left in the spool store: "
                         + ", ".join(self.models_not_replayed))
        return "; ".join(parts)


class Spool:
    """A local MLflow store that holds runs until the tracking server is back."""

    def __init__(self, root: Path) -> None:
        configured = os.environ.get(SPOOL_ENV)
        self.dir = Path(configured).resolve() if configured else root / "mlflow" / "spool"
        self._client: Any = None

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.dir / 'spool.db'}"

    @property
    def _pending_marker(self) -> Path:
        return self.dir / "PENDING"

    def pending(self) -> bool:
        """Cheap check (no database open) for spooled runs waiting to be replayed."""
        return self._pending_marker.exists()

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self.dir.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (self.dir / "artifacts" / name).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def create_run(self, experiment: str, tags: Mapping[str, str], run_name: str) -> str:
        """A run created while the server is unreachable; returns its spool id."""
        self._pending_marker.parent.mkdir(parents=True, exist_ok=True)
        self._pending_marker.touch()
        tags = {**tags, PROCESS_TAG: process_id()}
        run = self.client.create_run(self.experiment_id(experiment), tags=tags, run_name=run_name)
        return run.info.run_id

    def find_run(self, experiment: str, filter_string: str) -> str | None:
        found = self.client.search_runs([self.experiment_id(experiment)], filter_string,
                                        max_results=1)
        return found[0].info.run_id if found else None

    # ------------------------------------------------------------------ replay
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".replay.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def replay(self, remote: Any, remote_experiment: Callable[[str], str],
               find_parent: Callable[[str, str, Mapping[str, str], str], str]) -> ReplayReport:
        """Copy every finished spooled run to ``remote`` (an ``MlflowClient``), then drop it.

        ``remote_experiment(name)`` finds or creates the server's experiment;
        ``find_parent(experiment, pipeline_id, tags, run_name)`` finds or creates
        the server's parent run of a pipeline, so runs spooled by several stages
        (or several processes) of one execution land under one parent.
        Runs whose writer process is still alive are left for a later replay.
        """
        report = ReplayReport()
        if not self.pending():
            return report
        with self._locked():
            client = self.client
            for experiment in client.search_experiments():
                self._replay_experiment(experiment, remote, remote_experiment, find_parent,
                                        report)
            if not self._active_runs():
                self._pending_marker.unlink(missing_ok=True)
        return report

    def _active_runs(self) -> list[Any]:
        ids = [e.experiment_id for e in self.client.search_experiments()]
        return list(self.client.search_runs(ids, max_results=1)) if ids else []

    def _replay_experiment(self, experiment: Any, remote: Any,
                           remote_experiment: Callable[[str], str],
                           find_parent: Callable[..., str], report: ReplayReport) -> None:
        client = self.client
        runs = list(client.search_runs([experiment.experiment_id], max_results=50_000,
                                       order_by=["attributes.start_time ASC"]))
        live = {r.data.tags.get("refinery.pipeline_id") for r in runs
                if r.info.status == "RUNNING" and _writer_alive(r.data.tags.get(PROCESS_TAG))}
        # parents first, so their children find them on the server
        runs.sort(key=lambda r: r.data.tags.get("refinery.role") != "pipeline")
        if not runs:
            return
        remote_exp = remote_experiment(experiment.name)
        parents: set[str] = set()
        for run in runs:
            spool_id = run.info.run_id
            if run.data.tags.get("refinery.pipeline_id") in live:
                report.skipped_live.append(spool_id)
                continue
            target = self._target(run, remote, remote_exp, experiment.name, find_parent)
            self._copy(run, target, remote)
            for version in self._model_versions(spool_id):
                report.models_not_replayed.append(f"{version.name} v{version.version}")
            report.replayed[spool_id] = target
            client.delete_run(spool_id)
            with contextlib.suppress(Exception):
                local = Path(run.info.artifact_uri.removeprefix("file://")).parent
                if local.is_dir() and self.dir in local.parents:
                    shutil.rmtree(local)
            log.info("replayed spooled run %s -> %s", spool_id, target)
            if run.data.tags.get("refinery.role") == "pipeline":
                parents.add(target)
        for target in parents:
            _resolve_spool_refs(remote, target, remote_exp, report)

    def _model_versions(self, run_id: str) -> list[Any]:
        try:
            return list(self.client.search_model_versions(f"run_id = '{run_id}'"))
        except Exception:
            return []

    @staticmethod
    def _target(run: Any, remote: Any, remote_exp: str, experiment: str,
                find_parent: Callable[..., str]) -> str:
        tags = run.data.tags
        if tags.get(SPOOL_TARGET_TAG):
            return tags[SPOOL_TARGET_TAG]
        pid = tags.get("refinery.pipeline_id", "")
        if tags.get("refinery.role") == "pipeline":
            return find_parent(experiment, pid, _copied_tags(tags), run.info.run_name)
        again = remote.search_runs([remote_exp], f"tags.`{SPOOL_RUN_TAG}` = '{run.info.run_id}'",
                                   max_results=1)
        if again:  # an interrupted earlier replay created it already
            return again[0].info.run_id
        new_tags = _copied_tags(tags) | {SPOOL_RUN_TAG: run.info.run_id}
        if pid:
            new_tags["mlflow.parentRunId"] = find_parent(experiment, pid, {}, f"pipeline {pid}")
        created = remote.create_run(remote_exp, start_time=run.info.start_time, tags=new_tags,
                                    run_name=run.info.run_name)
        return created.info.run_id

    def _copy(self, run: Any, target: str, remote: Any) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        existing = remote.get_run(target).data.params
        params = [Param(k, v) for k, v in run.data.params.items() if k not in existing]
        tags = [RunTag(k, v) for k, v in _copied_tags(run.data.tags).items()]
        metrics: list[Metric] = []
        for key in run.data.metrics:
            metrics.extend(client.get_metric_history(run.info.run_id, key))
        for start in range(0, len(params), 100):
            remote.log_batch(target, params=params[start : start + 100])
        for start in range(0, len(tags), 100):
            remote.log_batch(target, tags=tags[start : start + 100])
        for start in range(0, len(metrics), 1000):
            remote.log_batch(target, metrics=metrics[start : start + 1000])
        if client.list_artifacts(run.info.run_id):
            with tempfile.TemporaryDirectory(prefix="refinery-replay-") as tmp:
                local = client.download_artifacts(run.info.run_id, "", tmp)
                remote.log_artifacts(target, local)
        if run.info.status in _TERMINAL:
            remote.set_terminated(target, status=run.info.status, end_time=run.info.end_time)


def _copied_tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k not in _NOT_COPIED and k != PROCESS_TAG}


def _resolve_spool_refs(remote: Any, run_id: str, experiment_id: str,
                        report: ReplayReport) -> None:
    """Parent tags written offline name stage runs as ``spool:<id>``; point them at the
    replayed server runs (replayed now, or by an earlier replay)."""
    for key, value in remote.get_run(run_id).data.tags.items():
        if not value.startswith("spool:"):
            continue
        spool_id = value.removeprefix("spool:")
        target = report.replayed.get(spool_id)
        if target is None:
            found = remote.search_runs([experiment_id], f"tags.`{SPOOL_RUN_TAG}` = '{spool_id}'",
                                       max_results=1)
            target = found[0].info.run_id if found else None
        if target is not None:
            remote.set_tag(run_id, key, target)
