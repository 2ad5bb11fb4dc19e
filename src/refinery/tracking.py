"""The one module that talks to MLflow.

Stages never import mlflow: they get a :class:`StageRun` from
:func:`stage_run` and log through it. That keeps tracking policy (where the
store is, how runs nest, how metrics are batched, what happens when the
server is down) in one place.

Run tree: every pipeline execution is one *parent* run (tag
``refinery.role=pipeline``) and every stage that executes is a child of it.
The stages of one execution find the same parent through a pipeline id: the
``REFINERY_PIPELINE_ID`` environment variable when an orchestrator sets it
(the Prefect flow does), else the id of the ``dvc repro``/``dvc exp run``
process that launched them. The parent carries the full params, the git
commit, the ``dvc.lock`` hash, the DVC experiment name, the Prefect flow-run
id, each stage's metrics as ``<stage>.<metric>``, the evaluation's headline
metrics, and for every stage ``refinery.stage.<name>`` = the run that
produced its current outputs with ``refinery.stage.<name>.state`` =
``executed`` or ``reused`` (read from ``lineage/<stage>.json``, see
:mod:`refinery.lineage`).

Unreachable server: with ``tracking.on_unreachable: fail`` (default) a stage
raises :class:`TrackingUnavailable` before its work starts; with ``defer`` it
runs and its records go to the local spool (:mod:`refinery.tracking_spool`).
A server lost *in the middle* of a stage never stops the stage in either
mode: the work already under way is worth more than a live dashboard, so the
rest of its records are spooled, its outputs are written, and with ``fail``
the *next* stage refuses to start until the server is back.

Beside it: :mod:`refinery.tracking_context` (where records go, who launched
the execution), :mod:`refinery.tracking_channel` (server or spool, per call),
:mod:`refinery.tracking_spool` (the spool and its replay) and
:mod:`refinery.lineage` (which run produced a stage's outputs). Import the
public names from here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery import lineage
from refinery.tracking_channel import (
    DEFERRED_TAG,
    ROLE_TAG,
    STAGE_TAG,
    Channel,
    OnUnreachable,
    RunRef,
    _param_items,
    experiment_id,
    flatten,
)
from refinery.tracking_context import (
    DEFAULT_STORE_DIR,
    FLOW_RUN_ID_ENV,
    FLOW_RUN_NAME_ENV,
    FLOW_RUN_URL_ENV,
    PIPELINE_ID_ENV,
    PIPELINE_TAG,
    RunContext,
    TrackingUnavailable,
    check_reachable,
    default_tracking_uri,
    dvc_lock_md5,
    git_commit,
    is_reachable,
    pipeline_id,
    run_url,
    store_root,
    tracking_uri,
    ui_base,
)
from refinery.tracking_spool import ReplayReport

__all__ = [
    "DEFAULT_STORE_DIR", "DEFERRED_TAG", "DVC_EXPERIMENT_TAG", "FLOW_RUN_ID_ENV",
    "FLOW_RUN_NAME_ENV", "FLOW_RUN_URL_ENV", "PIPELINE_ID_ENV", "PIPELINE_TAG", "ROLE_TAG",
    "STAGE_TAG", "Channel",
    "NullRun", "PipelineRecord", "ReplayReport", "RunContext", "RunRef", "StageRecord",
    "StageRun", "TrackingUnavailable", "begin_pipeline", "check_reachable", "dataset_entity",
    "default_tracking_uri", "dvc_lock_md5", "end_pipeline", "experiment_id", "flatten",
    "git_commit", "is_reachable", "pipeline_id", "run_url", "stage_run", "store_root",
    "sync_spool", "tracking_uri", "ui_base", "workspace_record",
]

log = logging.getLogger(__name__)

HEADLINE_METRICS = Path("metrics/evaluate.json")  # the evaluate stage's headline numbers
HEADLINE_STAGE = "evaluate"
DVC_EXPERIMENT_TAG = "refinery.dvc_experiment"  # on a parent run: its DVC experiment's name


def _numbers(path: Path, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON metrics file, flattened (missing or bad file: none)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, Mapping):
        return {}
    return {f"{prefix}{k}": float(v) for k, v in flatten(data).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


# ------------------------------------------------------------------------ stage runs


@dataclass
class StageRun:
    """Handle a stage logs through; metrics are buffered and sent in batches."""

    channel: Channel
    ref: RunRef
    parent: RunRef
    stage: str
    _metrics: list[Any] = field(default_factory=list)
    _last_flush: float = field(default_factory=time.monotonic)
    flush_every_s: float = 15.0
    #: logged models made by this run (row name -> model id), for its lineage file
    models: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.ref.id

    @property
    def parent_run_id(self) -> str | None:
        return self.parent.id or None

    @property
    def deferred(self) -> bool:
        """True once any record of this run went to the spool."""
        return self.ref.spool_id is not None

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
        """Send buffered metrics (batches of at most 1000, the server's limit)."""
        batch, self._metrics = self._metrics, []
        self.channel.log_batch(self.ref, metrics=batch)
        self._last_flush = time.monotonic()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.channel.log_batch(self.ref, params=_param_items(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.channel.log_batch(self.ref, tags=tags)

    # -- artifacts --------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.channel.call(self.ref, "log_artifact", str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.channel.call(self.ref, "log_artifacts", str(directory), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.channel.call(self.ref, "log_dict", obj, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.channel.call(self.ref, "log_figure", figure, artifact_file)

    # -- data sets and models ---------------------------------------------------------
    def log_datasets(self, described: Mapping[str, Mapping[str, Any]],
                     contexts: Sequence[tuple[str, str]]) -> None:
        """Name the data sets this run read, with their role (``training``, ...), as
        MLflow dataset inputs: the runs list's Datasets column and the run page show them.
        ``described``: :func:`refinery.formats.prepared.datasets`."""
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(dataset_entity(described[split]),
                               [InputTag("mlflow.data.context", context)])
                  for split, context in contexts if split in described]
        if inputs:
            self.channel.call(self.ref, "log_inputs", datasets=inputs)

    def log_model_metrics(self, metrics: Mapping[str, float], model_id: str,
                          dataset: Mapping[str, Any] | None = None) -> None:
        """Metrics *of a logged model* (on a data set): they show on the model's page."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        name, digest = (dataset["name"], dataset["digest"]) if dataset else (None, None)
        batch = [Metric(k, float(v), stamp, 0, model_id=model_id, dataset_name=name,
                        dataset_digest=digest) for k, v in metrics.items() if v is not None]
        self.channel.log_batch(self.ref, metrics=batch)

    def has_model(self, model_id: str) -> bool:
        """Whether the server this run logs to knows the logged model (a lineage file
        restored by DVC may name one of another server, or of a reset one)."""
        if not (self.channel.live and self.ref.remote_id):
            return False
        try:
            self.channel.remote.get_logged_model(model_id)
        except Exception:
            return False
        return True

    @contextlib.contextmanager
    def active(self) -> Iterator[bool]:
        """Make this run MLflow's active run, for APIs (model logging) that need one.

        Yields ``True`` on the tracking server. While deferred it yields
        ``False`` and the active run is the spool copy (MLflow's global URIs
        point at the spool too): what is logged there, e.g. a registered
        model, stays in the spool store; replay copies run records and
        artifacts but not registered model versions.
        """
        import mlflow

        live = self.channel.live
        run_id = self.ref.remote_id if live else self.channel.spool_run_id(self.ref)
        self.channel.point_mlflow()
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            yield live


class NullRun:
    """Stands in for a :class:`StageRun` where nothing is tracked (non-zero DDP ranks)."""

    run_id = ""
    parent_run_id = None
    deferred = False

    def __init__(self) -> None:
        self.models: dict[str, str] = {}

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

    def log_datasets(self, described: Mapping[str, Mapping[str, Any]],
                     contexts: Sequence[tuple[str, str]]) -> None:
        return None

    def log_model_metrics(self, metrics: Mapping[str, float], model_id: str,
                          dataset: Mapping[str, Any] | None = None) -> None:
        return None

    def has_model(self, model_id: str) -> bool:
        return False

    @contextlib.contextmanager
    def active(self) -> Iterator[bool]:
        yield False


def dataset_entity(described: Mapping[str, Any]) -> Any:
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


def _workspace_params(workspace: Path) -> dict[str, Any] | None:
    """The full, validated params of the workspace (for the parent run), if readable."""
    from refinery.params import ParamsError, load_params

    try:
        return load_params(workspace / "params.yaml").to_dict()
    except ParamsError:
        return None


def _stage_order() -> list[str]:
    from refinery.pipeline import STAGES

    return [s.name for s in STAGES]


def workspace_record(channel: Channel, context: RunContext, stages: Sequence[str],
                     workspace: Path) -> tuple[dict[str, str], dict[str, float]]:
    """Parent tags and metrics for ``stages``, read from their lineage and metrics files.

    A stage whose lineage names this execution's pipeline id was *executed*;
    any other lineage file was restored or kept by DVC: the stage was *reused*
    and the tag points at the run that produced those outputs.
    """
    from refinery import paths

    tags: dict[str, str] = {}
    metrics: dict[str, float] = {}
    for stage in stages:
        record = lineage.read(stage, workspace)
        if record is None:
            continue
        executed = record.pipeline_id == context.pipeline_id
        tags[f"refinery.stage.{stage}"] = channel.resolve(record)
        tags[f"refinery.stage.{stage}.state"] = "executed" if executed else "reused"
        metrics.update(_numbers(workspace / paths.metrics_file(stage), prefix=f"{stage}."))
        if stage == HEADLINE_STAGE:
            metrics.update(_numbers(workspace / HEADLINE_METRICS))
    lock = dvc_lock_md5(workspace)
    if lock:
        tags["refinery.dvc_lock_md5"] = lock
    return tags, metrics


def _log_parent_datasets(channel: Channel, parent: RunRef, stages: Sequence[str],
                         workspace: Path) -> None:
    """The data sets of the recorded stages on the parent too, each with its first role:
    the runs list folds the stage runs under their parent and shows the parent's."""
    from refinery import paths
    from refinery.pipeline import STAGES

    try:  # prepare's descriptions (refinery.formats.prepared.describe), read without torch
        meta = json.loads((workspace / paths.PREPARED / "meta.json").read_text("utf-8"))
    except (OSError, ValueError):
        return
    described = meta.get("datasets") or {}
    roles: dict[str, str] = {}
    # a split's role in the stages that read it; prepare's ("prepared") only if none did
    for stage in sorted(STAGES, key=lambda s: s.name == "prepare"):
        if stage.name in stages:
            for split, context in stage.datasets:
                roles.setdefault(split, context)
    inputs = [(split, context) for split, context in roles.items() if split in described]
    if inputs:
        from mlflow.entities import DatasetInput, InputTag

        channel.call(parent, "log_inputs", datasets=[
            DatasetInput(dataset_entity(described[split]),
                         [InputTag("mlflow.data.context", context)])
            for split, context in inputs])


def _metric_items(values: Mapping[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(k, v, stamp, 0) for k, v in values.items()]


def _configured_mode(params: Mapping[str, Any] | None) -> OnUnreachable:
    mode = ((params or {}).get("tracking") or {}).get("on_unreachable", "fail")
    return "defer" if mode == "defer" else "fail"


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    experiment: str = "refinery",
    tags: Mapping[str, Any] | None = None,
    on_unreachable: OnUnreachable | None = None,
    system_metrics: bool = False,
) -> Iterator[StageRun]:
    """Open the MLflow child run of one stage execution and close it with its outcome.

    Runs before the stage's work, so an unreachable server fails the stage
    before anything expensive (``on_unreachable`` defaults to the
    workspace's ``tracking.on_unreachable``). On success it writes
    ``lineage/<stage>.json`` and records the stage on the parent run.
    ``system_metrics``: sample CPU, memory (and GPU, with NVML) on the run
    every ``tracking.system_metrics_s`` seconds while the stage works.
    """
    workspace = Path.cwd()
    full_params = _workspace_params(workspace)
    mode = on_unreachable or _configured_mode(full_params)
    channel = Channel.open(mode, f"stage '{stage}'")
    context = RunContext.from_env()
    parent = channel.parent(experiment, context, full_params)
    if not context.orchestrated:
        channel.call(parent, "update_run", status="RUNNING")
    run_tags = {ROLE_TAG: "stage", STAGE_TAG: stage, **context.tags(),
                "mlflow.parentRunId": parent.id, "mlflow.runName": stage,
                "refinery.dvc_lock_md5": dvc_lock_md5(workspace) or ""}
    run_tags.update({k: str(v) for k, v in (tags or {}).items()})
    ref = channel.create_run(experiment, {k: v for k, v in run_tags.items() if v}, stage)
    run = StageRun(channel=channel, ref=ref, parent=parent, stage=stage)
    run.log_params(params)
    _announce(channel, experiment, ref, parent)
    monitor = _system_metrics(channel, ref, full_params) if system_metrics else None
    started = time.monotonic()
    try:
        yield run
    except BaseException as exc:
        _stop(monitor)
        with contextlib.suppress(Exception):
            run.flush()
            message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            run.set_tags({"refinery.error": message[:5000]})
            channel.call(ref, "set_terminated", status="FAILED")
            channel.log_batch(parent, tags={f"refinery.stage.{stage}": run.run_id,
                                            f"refinery.stage.{stage}.state": "failed"})
            if not context.orchestrated:
                channel.call(parent, "set_terminated", status="FAILED")
        raise
    _stop(monitor)
    run.log_metrics({"stage_seconds": time.monotonic() - started})
    run.flush()
    channel.call(ref, "set_terminated", status="FINISHED")
    lineage.write(lineage.Lineage(
        stage=stage, pipeline_id=context.pipeline_id, experiment=experiment,
        run_id=ref.remote_id, parent_run_id=parent.remote_id, spool_run_id=ref.spool_id,
        deferred=run.deferred, finished_at=lineage.Lineage.now(), models=dict(run.models),
    ), workspace)
    _record_on_parent(channel, context, parent, stage, workspace)


def _announce(channel: Channel, experiment: str, ref: RunRef, parent: RunRef) -> None:
    """Name the runs in the log, as links that open MLflow's training view."""
    if not (channel.live and ref.remote_id and ui_base(channel.uri)):
        return
    exp = channel.remote_experiment(experiment)
    log.info("MLflow: stage run %s, pipeline run %s", run_url(exp, ref.remote_id, channel.uri),
             run_url(exp, parent.remote_id or "", channel.uri))


def _system_metrics(channel: Channel, ref: RunRef, params: Mapping[str, Any] | None) -> Any:
    """MLflow's own sampler (CPU, memory, disk, network; GPU when ``pynvml`` is installed)
    on the stage's server run. Nothing while spooling: its samples would be lost anyway."""
    if not (channel.live and ref.remote_id):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    interval = float(((params or {}).get("tracking") or {}).get("system_metrics_s", 5.0))
    # MLflow logs "Started monitoring" at INFO, and "Skip logging GPU metrics" on every CPU box
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(ref.remote_id, sampling_interval=interval,
                                   tracking_uri=channel.uri)
    monitor.start()
    return monitor


def _stop(monitor: Any) -> None:
    """Stop sampling, and send the samples of the last, partial interval too (MLflow drops
    them, so a stage shorter than one interval would show none). A sampler that cannot
    send (server gone) never fails the stage."""
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor.finish()
            pending = monitor.aggregate_metrics()
            if pending:
                monitor.publish_metrics(pending)
                monitor.mlflow_logger.flush()


def _record_on_parent(channel: Channel, context: RunContext, parent: RunRef, stage: str,
                      workspace: Path) -> None:
    """Tag the parent with this stage and the stages before it (executed or reused).

    Only stages up to this one: a later stage's lineage file may still be an
    older execution's, about to be replaced. The stage's outputs are written
    by now, so a failure here is logged, never raised.
    """
    order = _stage_order()
    upto = order[: order.index(stage) + 1] if stage in order else [stage]
    try:
        tags, metrics = workspace_record(channel, context, upto, workspace)
        channel.log_batch(parent, metrics=_metric_items(metrics), tags=tags)
        _log_parent_datasets(channel, parent, upto, workspace)
        if not context.orchestrated:
            channel.call(parent, "set_terminated", status="FINISHED")
    except Exception as exc:
        log.warning("could not update the pipeline's parent run: %s", exc)


# ------------------------------------------------------------- the flow's pipeline API


@dataclass
class StageRecord:
    stage: str
    run_id: str
    state: str  # executed | reused | failed
    url: str | None = None


@dataclass
class PipelineRecord:
    """The parent run of one execution and its stages, for reports and links."""

    pipeline_id: str
    experiment: str
    experiment_id: str | None
    parent_run_id: str
    parent_url: str | None
    deferred: bool
    stages: list[StageRecord] = field(default_factory=list)


def begin_pipeline(context: RunContext, params: Mapping[str, Any], workspace: Path,
                   overrides: Mapping[str, Any] | None = None) -> PipelineRecord:
    """Create (or find) the parent run before any stage runs; fail fast if the server is down."""
    experiment = params.get("tracking", {}).get("experiment", "refinery")
    channel = Channel.open(_configured_mode(params), "the pipeline", root=workspace)
    parent = channel.parent(experiment, context, params)
    extra = {"refinery.overrides": json.dumps(dict(overrides), sort_keys=True)} if overrides else {}
    channel.log_batch(parent, tags=extra)
    channel.call(parent, "update_run", status="RUNNING")
    return _record(channel, experiment, context, parent, [])


def end_pipeline(context: RunContext, params: Mapping[str, Any], stages: Sequence[str],
                 workspace: Path, failed: bool,
                 tags: Mapping[str, str] | None = None) -> PipelineRecord:
    """Record every stage of ``stages`` (and ``tags``) on the parent and close it.

    Never fails for tracking reasons: the stages' work is done, so an
    unreachable server here only defers these records to the spool.
    """
    experiment = params.get("tracking", {}).get("experiment", "refinery")
    channel = Channel.open("defer", "recording the pipeline", root=workspace)
    parent = channel.parent(experiment, context, params)
    extra = {k: v for k, v in (tags or {}).items() if v}
    tags, metrics = workspace_record(channel, context, stages, workspace)
    tags.update(extra)
    channel.log_batch(parent, metrics=_metric_items(metrics), tags=tags)
    _log_parent_datasets(channel, parent, stages, workspace)
    channel.call(parent, "set_terminated", status="FAILED" if failed else "FINISHED")
    records = [StageRecord(s, tags[f"refinery.stage.{s}"], tags[f"refinery.stage.{s}.state"])
               for s in stages if f"refinery.stage.{s}" in tags]
    return _record(channel, experiment, context, parent, records)


def _record(channel: Channel, experiment: str, context: RunContext, parent: RunRef,
            stages: list[StageRecord]) -> PipelineRecord:
    exp_id = None
    if channel.live:
        with contextlib.suppress(Exception):
            exp_id = channel.remote_experiment(experiment)
    for record in stages:
        if exp_id and not record.run_id.startswith("spool:"):
            record.url = run_url(exp_id, record.run_id, channel.uri)
    return PipelineRecord(
        pipeline_id=context.pipeline_id, experiment=experiment, experiment_id=exp_id,
        parent_run_id=parent.id,
        parent_url=run_url(exp_id, parent.remote_id, channel.uri)
        if exp_id and parent.remote_id else None,
        deferred=channel.deferred, stages=stages,
    )


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
    exp_id = channel.remote_experiment(experiment)
    tags = {ROLE_TAG: "seeds", "refinery.seeds_name": name, "mlflow.runName": f"seeds {name}",
            "refinery.dvc_experiments": ",".join(experiments),
            "mlflow.source.git.commit": git_commit() or ""}
    ref = channel.create_run(experiment, {k: v for k, v in tags.items() if v}, f"seeds {name}")
    channel.log_batch(ref, metrics=_metric_items(metrics), params=_param_items(params))
    for artifact in artifacts:
        channel.call(ref, "log_artifact", str(artifact), "seeds")
    children: dict[str, str] = {}
    for dvc_experiment in experiments:
        query = (f"tags.`refinery.dvc_experiment` = '{dvc_experiment}' and "
                 f"tags.`{ROLE_TAG}` = 'pipeline'")
        for run in channel.remote.search_runs([exp_id], query):
            channel.remote.set_tag(run.info.run_id, "mlflow.parentRunId", ref.remote_id)
            children[dvc_experiment] = run.info.run_id
    channel.call(ref, "set_terminated", status="FINISHED")
    return SeedsRecord(ref.remote_id or ref.id, run_url(exp_id, ref.remote_id or "", channel.uri),
                       children, [e for e in experiments if e not in children])


def sync_spool(uri: str | None = None, root: Path | None = None) -> ReplayReport:
    """Replay the spool now; raise :class:`TrackingUnavailable` if the server is still down."""
    channel = Channel(uri, root)
    if not channel.spool.pending():
        return ReplayReport()
    check_reachable(channel.uri)
    channel.point_mlflow()  # served artifacts (mlflow-artifacts:/) resolve through it
    return channel.replay_pending(strict=True)
