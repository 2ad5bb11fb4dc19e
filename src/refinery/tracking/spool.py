"""The local spool: the runs of stages that started while the server was unreachable.

With ``tracking.on_unreachable: defer`` a stage that finds the server down at
its start runs anyway and logs to a local MLflow store (sqlite + files) under
``mlflow/spool/``, git-ignored. A real MLflow store rather than a private
journal: every logging call behaves as it would against the server (artifacts
are copied at log time) and the spool can be browsed with ``mlflow ui``.

:meth:`Spool.replay` copies the spooled runs to the server (params, tags, full
metric histories, artifacts, final status) as new runs tagged
``refinery.spool_run=<spool id>``, under the server's parent of their pipeline
id. The next stage that finds the server up replays, so do ``refinery
sync-tracking`` and the Prefect flow at its end.
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
PROCESS_TAG = "refinery.process"  # host:pid:start of the process that wrote a spool run
_TERMINAL = {"FINISHED", "FAILED", "KILLED"}
_NOT_COPIED = {"mlflow.parentRunId", PROCESS_TAG}


def process_id() -> str:
    """``host:pid:start``: identifies a live writer even if pids are reused."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{int(me.create_time())}"


def _writer_alive(process: str | None) -> bool:
    """Is another live process of this host still writing the run? (Ours is not
    "another": a replay runs between our own writes, never during one.)"""
    import psutil

    host, _, rest = (process or "").partition(":")
    pid, _, started = rest.partition(":")
    if not process or process == process_id() or host != socket.gethostname():
        return False
    try:
        return int(psutil.Process(int(pid)).create_time()) == int(started)
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

    def pending(self) -> bool:
        """Cheap check (no database opened) for spooled runs waiting to be replayed."""
        return (self.dir / "PENDING").exists()

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "PENDING").touch()
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
        tags = {**tags, PROCESS_TAG: process_id()}
        return self.client.create_run(self.experiment_id(experiment), tags=tags,
                                      run_name=run_name).info.run_id

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
        """Copy every spooled run to ``remote`` (an ``MlflowClient``), then drop it.

        ``find_parent(experiment, pipeline_id, tags, run_name)`` finds or creates
        the server's parent run of a pipeline, so runs spooled by several stages
        (or processes) of one execution land under one parent. Runs of an
        execution whose writer process is still alive wait for a later replay.
        """
        report = ReplayReport()
        if not self.pending():
            return report
        with self._locked():
            for experiment in self.client.search_experiments():
                self._replay_experiment(experiment, remote, remote_experiment, find_parent,
                                        report)
            ids = [e.experiment_id for e in self.client.search_experiments()]
            if not ids or not self.client.search_runs(ids, max_results=1):
                (self.dir / "PENDING").unlink(missing_ok=True)
        return report

    def _replay_experiment(self, experiment: Any, remote: Any,
                           remote_experiment: Callable[[str], str],
                           find_parent: Callable[..., str], report: ReplayReport) -> None:
        runs = list(self.client.search_runs([experiment.experiment_id], max_results=50_000,
                                            order_by=["attributes.start_time ASC"]))
        if not runs:  # (the store's empty "Default" experiment among them)
            return
        remote_exp = remote_experiment(experiment.name)
        live = {r.data.tags.get("refinery.pipeline_id") for r in runs
                if r.info.status == "RUNNING" and _writer_alive(r.data.tags.get(PROCESS_TAG))}
        runs.sort(key=lambda r: r.data.tags.get("refinery.role") != "pipeline")  # parents first
        parents: set[str] = set()
        for run in runs:
            spool_id, tags = run.info.run_id, run.data.tags
            if tags.get("refinery.pipeline_id") in live:
                report.skipped_live.append(spool_id)
                continue
            target = self._target(run, remote, remote_exp, experiment.name, find_parent)
            self._copy(run, target, remote)
            with contextlib.suppress(Exception):
                for version in self.client.search_model_versions(f"run_id = '{spool_id}'"):
                    report.models_not_replayed.append(f"{version.name} v{version.version}")
            report.replayed[spool_id] = target
            self.client.delete_run(spool_id)
            local = Path(run.info.artifact_uri.removeprefix("file://")).parent
            if local.is_dir() and self.dir in local.parents:
                shutil.rmtree(local, ignore_errors=True)
            log.info("replayed spooled run %s -> %s", spool_id, target)
            if tags.get("refinery.role") == "pipeline":
                parents.add(target)
        for target in parents:
            _resolve_spool_refs(remote, target, remote_exp, report)

    @staticmethod
    def _target(run: Any, remote: Any, remote_exp: str, experiment: str,
                find_parent: Callable[..., str]) -> str:
        tags = _copied(run.data.tags)
        pid = tags.get("refinery.pipeline_id", "")
        if tags.get("refinery.role") == "pipeline":
            return find_parent(experiment, pid, tags, run.info.run_name)
        again = remote.search_runs([remote_exp], f"tags.`{SPOOL_RUN_TAG}` = '{run.info.run_id}'",
                                   max_results=1)
        if again:  # an interrupted earlier replay created it already
            return again[0].info.run_id
        tags[SPOOL_RUN_TAG] = run.info.run_id
        if pid:
            tags["mlflow.parentRunId"] = find_parent(experiment, pid, {}, f"pipeline {pid}")
        return remote.create_run(remote_exp, start_time=run.info.start_time, tags=tags,
                                 run_name=run.info.run_name).info.run_id

    def _copy(self, run: Any, target: str, remote: Any) -> None:
        """Records in one batch per kind; MLflow's client splits them to the server's limits."""
        from mlflow.entities import Metric, Param, RunTag

        existing = remote.get_run(target).data.params
        metrics: list[Metric] = []
        for key in run.data.metrics:
            metrics.extend(self.client.get_metric_history(run.info.run_id, key))
        remote.log_batch(target, metrics=metrics,
                         params=[Param(k, v) for k, v in run.data.params.items()
                                 if k not in existing],
                         tags=[RunTag(k, v) for k, v in _copied(run.data.tags).items()])
        if self.client.list_artifacts(run.info.run_id):
            with tempfile.TemporaryDirectory(prefix="refinery-replay-") as tmp:
                remote.log_artifacts(target, self.client.download_artifacts(run.info.run_id,
                                                                            "", tmp))
        if run.info.status in _TERMINAL:
            remote.set_terminated(target, status=run.info.status, end_time=run.info.end_time)


def _copied(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k not in _NOT_COPIED}


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
