"""The channel: records go to the tracking server, or to the spool once it is gone.

:class:`Channel` wraps ``MlflowClient`` calls by run (:class:`RunRef`), so a
stage never sees whether a record reached the server or waits in the local
spool (:mod:`refinery.tracking_spool`). It also finds or creates the parent
run of a pipeline execution, and resolves lineage records to server run ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from refinery import lineage
from refinery.tracking_context import (
    EXPERIMENT_KIND,
    PIPELINE_TAG,
    RunContext,
    TrackingUnavailable,
    artifact_location,
    check_reachable,
    default_tracking_uri,
    is_reachable,
    store_root,
    tracking_uri,
    ui_base,
)
from refinery.tracking_spool import SPOOL_RUN_TAG, SPOOL_TARGET_TAG, ReplayReport, Spool

log = logging.getLogger(__name__)

ROLE_TAG = "refinery.role"
STAGE_TAG = "refinery.stage"
DEFERRED_TAG = "refinery.deferred"
OnUnreachable = Literal["fail", "defer"]


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


def _param_items(params: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, json.dumps(v) if isinstance(v, list | tuple | dict) else str(v))
            for k, v in flatten(params).items()]


@dataclass
class RunRef:
    """One run as the channel knows it: its server id, its spool id, or both."""

    experiment: str
    tags: dict[str, str]
    remote_id: str | None = None
    spool_id: str | None = None

    @property
    def id(self) -> str:
        return self.remote_id or self.spool_id or ""


class Channel:
    """Sends records to the tracking server, or to the spool once it is unreachable.

    The switch is one-way for the life of the channel (one stage): flapping
    between stores would split a run's records unpredictably.
    """

    def __init__(self, uri: str | None = None, root: Path | None = None) -> None:
        root = root or store_root()
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
        self.spool = Spool(root)
        self.live = True
        self._remote: Any = None
        self._experiments: dict[str, str] = {}

    @classmethod
    def open(cls, mode: OnUnreachable, what: str, uri: str | None = None,
             root: Path | None = None) -> Channel:
        """Check the server first: fail fast (``fail``) or go to the spool (``defer``)."""
        channel = cls(uri, root)
        try:
            check_reachable(channel.uri)
        except TrackingUnavailable as exc:
            if mode == "fail":
                raise TrackingUnavailable(
                    f"{exc}; {what} did not start. Start the server, point MLFLOW_TRACKING_URI "
                    "at a live one, or set tracking.on_unreachable: defer in params.yaml to run "
                    "now and send the records later (refinery sync-tracking)."
                ) from None
            log.warning("%s; %s runs anyway and spools its records in %s "
                        "(tracking.on_unreachable: defer)", exc, what, channel.spool.dir)
            channel.live = False
            channel.point_mlflow()
            return channel
        channel.point_mlflow()  # before replay: served artifacts resolve through it
        channel.replay_pending(strict=False)
        return channel

    def point_mlflow(self) -> None:
        """Point MLflow's global URIs where this channel's records go (the server, or the
        spool once it is gone), so stage code that calls MLflow directly (model
        logging, the model registry) follows the same policy."""
        import mlflow

        if self.live:
            uri = self.uri
        else:
            self.spool.dir.mkdir(parents=True, exist_ok=True)
            uri = self.spool.uri
        saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        # MLflow also exports these to the environment; keep the user's configuration there
        # (later channels and child processes must still see the real server, not a spool).
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    @property
    def remote(self) -> Any:
        if self._remote is None:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True,
                                                                       exist_ok=True)
            self._remote = MlflowClient(tracking_uri=self.uri)
        return self._remote

    @property
    def deferred(self) -> bool:
        return not self.live

    def _went_offline(self, exc: BaseException) -> bool:
        """After a failed server call: switch to the spool if the server is gone."""
        if is_reachable(self.uri):
            return False
        log.warning("lost the MLflow tracking server %s (%s); spooling the rest of this "
                    "stage's records in %s", ui_base(self.uri), exc.__class__.__name__,
                    self.spool.dir)
        self.live = False
        self.point_mlflow()
        return True

    def remote_experiment(self, name: str) -> str:
        if name not in self._experiments:
            self._experiments[name] = experiment_id(self.remote, name, self.uri)
        return self._experiments[name]

    def create_run(self, experiment: str, tags: Mapping[str, str], run_name: str) -> RunRef:
        tags = dict(tags)
        if self.live:
            try:
                run = self.remote.create_run(self.remote_experiment(experiment), tags=tags,
                                             run_name=run_name)
                return RunRef(experiment, tags, remote_id=run.info.run_id)
            except Exception as exc:
                if not self._went_offline(exc):
                    raise
        tags[DEFERRED_TAG] = "true"
        return RunRef(experiment, tags, spool_id=self.spool.create_run(experiment, tags, run_name))

    def call(self, ref: RunRef, method: str, *args: Any, **kwargs: Any) -> Any:
        """``MlflowClient.<method>(run_id, ...)`` on the server, or on the run's spool copy."""
        if self.live and ref.remote_id:
            try:
                return getattr(self.remote, method)(ref.remote_id, *args, **kwargs)
            except Exception as exc:
                if not self._went_offline(exc):
                    raise
        return getattr(self.spool.client, method)(self.spool_run_id(ref), *args, **kwargs)

    def spool_run_id(self, ref: RunRef) -> str:
        """The run's id in the spool; a server run that lost its server gets a *shadow*
        there (tagged with its server id), which replay merges back into it."""
        if ref.spool_id is None:
            tags = {**ref.tags, SPOOL_TARGET_TAG: ref.remote_id or "", DEFERRED_TAG: "true"}
            ref.spool_id = self.spool.create_run(ref.experiment, tags,
                                                 ref.tags.get("mlflow.runName", ""))
        return ref.spool_id

    def log_batch(self, ref: RunRef, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
                  tags: Mapping[str, Any] | None = None) -> None:
        """Within the server's limits per request (1000 metrics, 100 params, 100 tags)."""
        from mlflow.entities import RunTag

        tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for start in range(0, len(metrics), 1000):
            self.call(ref, "log_batch", metrics=list(metrics[start : start + 1000]))
        for start in range(0, len(params), 100):
            self.call(ref, "log_batch", params=list(params[start : start + 100]))
        for start in range(0, len(tag_items), 100):
            self.call(ref, "log_batch", tags=tag_items[start : start + 100])

    # -- parents -------------------------------------------------------------------
    def find_parent(self, experiment: str, pid: str) -> RunRef | None:
        query = f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{ROLE_TAG}` = 'pipeline'"
        if self.live:
            try:
                found = self.remote.search_runs([self.remote_experiment(experiment)], query,
                                                max_results=1)
                if not found:
                    return None
                run = found[0]
                return RunRef(experiment, _identity(run.data.tags), remote_id=run.info.run_id)
            except Exception as exc:
                if not self._went_offline(exc):
                    raise
        spool_id = self.spool.find_run(experiment, query)
        return RunRef(experiment, {ROLE_TAG: "pipeline", PIPELINE_TAG: pid},
                      spool_id=spool_id) if spool_id else None

    def parent(self, experiment: str, context: RunContext,
               params: Mapping[str, Any] | None) -> RunRef:
        """Find the execution's parent run, or create it with the full params."""
        found = self.find_parent(experiment, context.pipeline_id)
        if found is not None:
            return found
        tags = {ROLE_TAG: "pipeline", **context.tags()}
        ref = self.create_run(experiment, tags, context.parent_run_name())
        if params:
            self.log_batch(ref, params=_param_items(params))
        return ref

    def remote_parent_id(self, experiment: str, pid: str, tags: Mapping[str, str],
                         run_name: str) -> str:
        """Find or create a pipeline's parent on the server (used by spool replay)."""
        query = f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{ROLE_TAG}` = 'pipeline'"
        exp = self.remote_experiment(experiment)
        found = self.remote.search_runs([exp], query, max_results=1)
        if found:
            return found[0].info.run_id
        tags = {**tags, ROLE_TAG: "pipeline", PIPELINE_TAG: pid}
        return self.remote.create_run(exp, tags=tags, run_name=run_name).info.run_id

    def resolve(self, record: lineage.Lineage) -> str:
        """The server run id behind a lineage record (looked up if it was deferred)."""
        if record.run_id:
            return record.run_id
        if record.spool_run_id and self.live:
            with contextlib.suppress(Exception):
                found = self.remote.search_runs(
                    [self.remote_experiment(record.experiment)],
                    f"tags.`{SPOOL_RUN_TAG}` = '{record.spool_run_id}'", max_results=1)
                if found:
                    return found[0].info.run_id
        return f"spool:{record.spool_run_id}"

    def replay_pending(self, strict: bool) -> ReplayReport:
        """Send spooled runs to the server. ``strict``: let errors out (``sync-tracking``)."""
        if not self.spool.pending():
            return ReplayReport()
        try:
            report = self.spool.replay(self.remote, self.remote_experiment,
                                       self.remote_parent_id)
        except Exception as exc:
            if strict:
                raise
            log.warning("could not replay the tracking spool yet: %s", exc)
            return ReplayReport()
        log.info("tracking spool: %s", report)
        return report


def _identity(tags: Mapping[str, str]) -> dict[str, str]:
    keep = (ROLE_TAG, PIPELINE_TAG, STAGE_TAG, "mlflow.runName")
    return {k: tags[k] for k in keep if k in tags}


def experiment_id(client: Any, name: str, uri: str | None = None) -> str:
    """The experiment's id, created (tagged as model training, not GenAI) if new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():  # an experiment made before the tag
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = artifact_location(uri or tracking_uri())
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by another stage
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id
