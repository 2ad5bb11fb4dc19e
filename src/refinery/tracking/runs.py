"""Stage runs, the parent run of a pipeline execution, and the multi-seed run.

What the parent carries (params, commit, each stage's metrics and the run behind its
outputs, executed or reused): README.md's table under "The MLflow run tree".
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery import fsutil, lineage, paths
from refinery.params import flatten
from refinery.tracking.channel import (
    Channel,
    OnUnreachable,
    TrackingUnavailable,
    tag_items,
    ui_base,
    unreachable,
)
from refinery.tracking.context import ROLE_TAG, STAGE_TAG, RunContext, dvc_lock_md5, git_commit

log = logging.getLogger(__name__)

HEADLINE_STAGE = "evaluate"  # its metrics go on the parent under their own names too
DVC_EXPERIMENT_TAG = "refinery.dvc_experiment"  # on a parent run: its DVC experiment's name


def _metric_items(values: Mapping[str, Any], step: int = 0, **extra: Any) -> list[Any]:
    """MLflow metrics of the numbers in ``values`` (numpy scalars too; None is skipped)."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(k, float(v), stamp, step, **extra) for k, v in values.items()
            if isinstance(v, numbers.Real)]


def _dataset(described: Mapping[str, Any]) -> Any:
    """An MLflow dataset record of one prepared split: metadata, not the pixels (they are
    in DVC's cache). Source: the download URL (``http``), else the builtin set (``code``)."""
    import numpy as np
    from mlflow.entities import Dataset
    from mlflow.types.schema import Schema, TensorSpec

    profile = dict(described["profile"])
    source = str(described["source"])
    web = source.startswith(("http://", "https://"))
    shape = (-1, profile["channels"], profile["side"], profile["side"])
    features = Schema([TensorSpec(np.dtype(np.uint8), shape, "images"),
                       TensorSpec(np.dtype(np.int64), (-1,), "labels")])
    schema = {"mlflow_tensorspec": {"features": features.to_json(), "targets": None}}
    return Dataset(name=str(described["name"]), digest=str(described["digest"]),
                   source_type="http" if web else "code",
                   source=json.dumps({"url": source} if web else {"tags": {"builtin": source}}),
                   schema=json.dumps(schema), profile=json.dumps(profile))


@dataclass
class StageRun:
    """Handle a stage logs through; metrics are buffered and sent in batches."""

    channel: Channel
    run_id: str
    flush_every_s: float = 15.0
    #: logged models made by this run (row name -> model id), for its lineage file
    models: dict[str, str] = field(default_factory=dict)
    _metrics: list[Any] = field(default_factory=list)
    _last_flush: float = field(default_factory=time.monotonic)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._metrics.extend(_metric_items(metrics, int(step or 0)))
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        batch, self._metrics = self._metrics, []
        self.channel.client.log_batch(self.run_id, metrics=batch)
        self._last_flush = time.monotonic()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.channel.client.log_batch(self.run_id, tags=tag_items(tags))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.channel.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.channel.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_datasets(self, described: Mapping[str, Mapping[str, Any]],
                     roles: Sequence[tuple[str, str]]) -> None:
        """The data sets this run read (``described``: :func:`refinery.formats.prepared.
        datasets`), each with its role (``training``, ``validation``, ...), as MLflow
        dataset inputs: the runs list's Datasets column."""
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(_dataset(described[split]),
                               [InputTag("mlflow.data.context", context)])
                  for split, context in roles if split in described]
        if inputs:
            self.channel.client.log_inputs(self.run_id, datasets=inputs)

    def log_model_metrics(self, metrics: Mapping[str, float], model_id: str,
                          dataset: Mapping[str, Any] | None = None) -> None:
        """Metrics *of a logged model* (on a data set): they show on the model's page."""
        name, digest = (dataset["name"], dataset["digest"]) if dataset else (None, None)
        self.channel.client.log_batch(self.run_id, metrics=_metric_items(
            metrics, model_id=model_id, dataset_name=name, dataset_digest=digest))

    def has_model(self, model_id: str) -> bool:
        """Whether the server knows the logged model (a lineage file restored by DVC may
        name one of another server, or of a reset one)."""
        try:
            return self.channel.live and bool(self.channel.client.get_logged_model(model_id))
        except Exception:
            return False

    @contextlib.contextmanager
    def active(self) -> Iterator[bool]:
        """Make this run MLflow's active run, for APIs (model logging, the registry) that
        need one. Yields whether it is on the server; while deferred, what is logged stays
        in the spool store (replay copies runs and artifacts, not model versions)."""
        import mlflow

        self.channel.point_mlflow()
        with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
            yield self.channel.live


class NullRun:
    """Stands in for a :class:`StageRun` where nothing is tracked (non-zero DDP ranks):
    every logging method does nothing."""

    run_id = ""

    def __init__(self) -> None:
        self.models: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None  # (has_model too: None, falsy)

    @contextlib.contextmanager
    def active(self) -> Iterator[bool]:
        yield False


def _parent(channel: Channel, experiment: str, context: RunContext,
            params: Mapping[str, Any] | None) -> str:
    return channel.parent(experiment, context.pipeline_id, context.tags(),
                          context.parent_run_name(), params)


def _configured(params: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    return ((params or {}).get("tracking") or {}).get(key, default)


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], *, experiment: str = "refinery",
              full_params: Mapping[str, Any] | None = None, recorded: Sequence[str] = (),
              roles: Sequence[tuple[str, str]] = (), on_unreachable: OnUnreachable | None = None,
              system_metrics: bool = False) -> Iterator[StageRun]:
    """Open the MLflow child run of one stage execution and close it with its outcome.

    Runs before the stage's work, so an unreachable server fails the stage before
    anything expensive (``on_unreachable`` defaults to ``tracking.on_unreachable``
    of ``full_params``, the workspace's params, which the parent run gets). On
    success it writes ``lineage/<stage>.json`` and records the stages of
    ``recorded`` (this one and those before it) on the parent, with the data
    sets of ``roles`` (split, role). ``system_metrics``: sample CPU, memory
    (and GPU, with NVML) every ``tracking.system_metrics_s`` seconds.
    """
    workspace = Path.cwd()
    mode = on_unreachable or _configured(full_params, "on_unreachable", "fail")
    channel = Channel.open(mode, f"stage '{stage}'")
    client, context = channel.client, RunContext.from_env()
    parent = _parent(channel, experiment, context, full_params)
    if not context.orchestrated:
        client.update_run(parent, status="RUNNING")
    tags = {ROLE_TAG: "stage", STAGE_TAG: stage, **context.tags(), "mlflow.parentRunId": parent,
            "refinery.dvc_lock_md5": dvc_lock_md5(workspace)}
    run = StageRun(channel, channel.create_run(experiment, tags, stage, params))
    if url := channel.url(experiment, run.run_id):  # links that open MLflow's training view
        log.info("MLflow: stage run %s, pipeline run %s", url, channel.url(experiment, parent))
    interval_s = float(_configured(full_params, "system_metrics_s", 5.0))
    try:
        with _system_metrics(channel, run.run_id, interval_s if system_metrics else None):
            yield run
        run.flush()
        client.set_terminated(run.run_id, status="FINISHED")
    except BaseException as exc:
        if channel.live and unreachable(channel.uri):
            if type(exc).__module__.split(".")[0] in {"mlflow", "requests", "urllib3"}:
                raise TrackingUnavailable(
                    f"lost the MLflow tracking server {ui_base(channel.uri)} during stage "
                    f"'{stage}'; its outputs are not recorded, so the next dvc repro runs it "
                    "again (training resumes from its last checkpoint)") from exc
            raise
        with contextlib.suppress(Exception):
            message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            run.set_tags({"refinery.error": message[:5000]})
            client.set_terminated(run.run_id, status="FAILED")
            client.log_batch(parent, tags=tag_items({f"refinery.stage.{stage}": run.run_id,
                                                     f"refinery.stage.{stage}.state": "failed"}))
            if not context.orchestrated:
                client.set_terminated(parent, status="FAILED")
        raise
    deferred = not channel.live
    lineage.write(lineage.Lineage(
        stage=stage, pipeline_id=context.pipeline_id, experiment=experiment,
        run_id=None if deferred else run.run_id, parent_run_id=None if deferred else parent,
        spool_run_id=run.run_id if deferred else None, deferred=deferred,
        finished_at=lineage.Lineage.now(), models=dict(run.models)), workspace)
    try:  # the outputs are written by now: a failure here is logged, never raised
        _record(channel, experiment, context, parent, recorded or [stage], roles, workspace)
        if not context.orchestrated:
            client.set_terminated(parent, status="FINISHED")
    except Exception as exc:
        log.warning("could not update the pipeline's parent run: %s", exc)


@contextlib.contextmanager
def _system_metrics(channel: Channel, run_id: str, interval_s: float | None) -> Iterator[None]:
    """Run MLflow's own sampler (CPU, memory, disk, network; GPU when ``pynvml`` is
    installed) on the server run: not while spooling (the samples would be lost), nor
    with no ``interval_s``. At the end it sends the last, partial interval too (MLflow
    drops it, so a stage shorter than one interval would show none)."""
    if not (channel.live and interval_s):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # MLflow logs "Started monitoring" at INFO, and "Skip logging GPU metrics" on every CPU box
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, tracking_uri=channel.uri, sampling_interval=interval_s)
    monitor.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a sampler never fails the stage
            monitor.finish()
            if pending := monitor.aggregate_metrics():
                monitor.publish_metrics(pending)
                monitor.mlflow_logger.flush()


# ------------------------------------------------------------- the flow's pipeline API


@dataclass
class StageRecord:
    stage: str
    run_id: str
    state: str  # executed | reused | failed
    url: str | None  # its page in the server's UI


@dataclass
class PipelineRecord:
    """The parent run of one execution and its stages, for reports and links."""

    pipeline_id: str
    experiment: str
    parent_run_id: str
    parent_url: str | None
    deferred: bool
    stages: list[StageRecord] = field(default_factory=list)


def _record(channel: Channel, experiment: str, context: RunContext, parent: str,
            stages: Sequence[str], roles: Sequence[tuple[str, str]], workspace: Path,
            tags: Mapping[str, str] | None = None) -> list[StageRecord]:
    """Tag the parent with ``stages`` (the run behind each one's outputs, executed by this
    execution or reused), their metrics, the data sets they read (``roles``), and ``tags``.

    A stage whose lineage names this execution's pipeline id was *executed*; any
    other lineage file was restored or kept by DVC: the stage was *reused*.
    """
    records: list[StageRecord] = []
    metrics: dict[str, Any] = {}
    tags = {**(tags or {}), "refinery.dvc_lock_md5": dvc_lock_md5(workspace) or ""}
    for stage in stages:
        record = lineage.read(stage, workspace)
        if record is not None:
            run_id = channel.resolve(record)
            run = StageRecord(stage, run_id, "executed" if record.pipeline_id ==
                              context.pipeline_id else "reused", channel.url(experiment, run_id))
            records.append(run)
            tags |= {f"refinery.stage.{stage}": run.run_id, f"refinery.stage.{stage}.state":
                     run.state}
            values = flatten(fsutil.read_json_object(workspace / paths.metrics_file(stage)))
            metrics.update({f"{stage}.{k}": v for k, v in values.items()})
            if stage == HEADLINE_STAGE:
                metrics.update(values)
    channel.client.log_batch(parent, metrics=_metric_items(metrics),
                             tags=tag_items({k: v for k, v in tags.items() if v}))
    # prepare's descriptions (refinery.formats.prepared.describe), read without torch
    meta = fsutil.read_json_object(workspace / paths.PREPARED / "meta.json")
    StageRun(channel, parent).log_datasets(meta.get("datasets") or {}, roles)
    return records


def begin_pipeline(context: RunContext, params: Mapping[str, Any], workspace: Path,
                   overrides: Mapping[str, Any] | None = None) -> PipelineRecord:
    """Create (or find) the parent run before any stage runs; fail fast if the server is down."""
    experiment = _configured(params, "experiment", "refinery")
    channel = Channel.open(_configured(params, "on_unreachable", "fail"), "the pipeline",
                           root=workspace)
    parent = _parent(channel, experiment, context, params)
    if overrides:
        channel.client.set_tag(parent, "refinery.overrides",
                               json.dumps(dict(overrides), sort_keys=True))
    channel.client.update_run(parent, status="RUNNING")
    return PipelineRecord(context.pipeline_id, experiment, parent,
                          channel.url(experiment, parent), not channel.live)


def end_pipeline(context: RunContext, params: Mapping[str, Any], stages: Sequence[str],
                 roles: Sequence[tuple[str, str]], workspace: Path, failed: bool,
                 tags: Mapping[str, str] | None = None) -> PipelineRecord:
    """Record ``stages`` (with the data sets of ``roles``, and ``tags``) on the parent and
    close it. Never fails for tracking reasons: the work is done, so an unreachable
    server here only defers these records to the spool."""
    experiment = _configured(params, "experiment", "refinery")
    channel = Channel.open("defer", "recording the pipeline", root=workspace)
    parent = _parent(channel, experiment, context, params)
    records = _record(channel, experiment, context, parent, stages, roles, workspace, tags)
    channel.client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
    return PipelineRecord(context.pipeline_id, experiment, parent,
                          channel.url(experiment, parent), not channel.live, records)


@dataclass
class SeedsRecord:
    run_id: str
    url: str | None
    children: dict[str, str]  # DVC experiment name -> its pipeline parent run
    missing: list[str]  # experiments whose pipeline run was not found (e.g. spooled)


def record_seeds(experiment: str, name: str, *, params: Mapping[str, Any],
                 metrics: Mapping[str, float], artifacts: Sequence[Path],
                 experiments: Sequence[str]) -> SeedsRecord:
    """One parent run for a multi-seed run: the summary's numbers and files, and the seeds'
    pipeline runs (found by their DVC experiment name) moved under it as its children.

    Runs after every seed has finished, so the server must be up (the seeds' own
    runs may have been spooled, and are then listed as ``missing``).
    """
    channel = Channel.open("fail", "recording the seeds")
    client = channel.client
    run_id = channel.create_run(experiment, {
        ROLE_TAG: "seeds", "refinery.seeds_name": name,
        "refinery.dvc_experiments": ",".join(experiments),
        "mlflow.source.git.commit": git_commit()}, f"seeds {name}", params)
    client.log_batch(run_id, metrics=_metric_items(metrics))
    for artifact in artifacts:
        client.log_artifact(run_id, str(artifact), "seeds")
    children: dict[str, str] = {}
    for dvc_experiment in experiments:  # its newest pipeline run (a rerun makes another)
        pipeline = {DVC_EXPERIMENT_TAG: dvc_experiment, ROLE_TAG: "pipeline"}
        if found := channel.find(experiment, pipeline):
            client.set_tag(found, "mlflow.parentRunId", run_id)
            children[dvc_experiment] = found
    client.set_terminated(run_id, status="FINISHED")
    return SeedsRecord(run_id, channel.url(experiment, run_id), children,
                       [e for e in experiments if e not in children])
