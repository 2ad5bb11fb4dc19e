"""The channel: one stage's records go to the tracking server, or all to the spool.

Which one is decided once, when the channel opens (:meth:`Channel.open`), from
a health check: the server if it answers, else the spool (``defer``) or a
:class:`TrackingUnavailable` before any work (``fail``). There is no switch
mid-stage: a server lost then surfaces as MLflow's own error after its retries,
and the stage fails (see README, "If the tracking server goes away").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from refinery import lineage
from refinery.tracking.context import (
    EXPERIMENT_KIND,
    PIPELINE_TAG,
    TrackingUnavailable,
    artifact_location,
    check_reachable,
    store_root,
    tracking_uri,
)
from refinery.tracking.spool import SPOOL_RUN_TAG, ReplayReport, Spool

log = logging.getLogger(__name__)

ROLE_TAG = "refinery.role"
STAGE_TAG = "refinery.stage"
DEFERRED_TAG = "refinery.deferred"
OnUnreachable = Literal["fail", "defer"]


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tuples stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def param_items(params: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, json.dumps(v) if isinstance(v, list | tuple | dict) else str(v))
            for k, v in flatten(params).items()]


def tag_items(tags: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]


class Channel:
    """An ``MlflowClient`` on the server, or on the spool when ``live`` is False."""

    def __init__(self, uri: str | None = None, root: Path | None = None) -> None:
        root = root or store_root()
        self.uri = uri or tracking_uri(root)
        self.spool = Spool(root)
        self.live = True
        self._clients: dict[str, Any] = {}
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
        channel.point_mlflow()  # before replay too: served artifacts resolve through it
        if channel.live:
            channel.replay_pending(strict=False)
        return channel

    @property
    def target(self) -> str:
        """Where this channel's records go: the server's URI, or the spool's."""
        return self.uri if self.live else self.spool.uri

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

    def _client(self, uri: str) -> Any:
        if uri not in self._clients:
            from mlflow.tracking import MlflowClient

            if uri.startswith("sqlite:///"):
                Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._clients[uri] = (self.spool.client if uri == self.spool.uri
                                  else MlflowClient(tracking_uri=uri))
        return self._clients[uri]

    @property
    def client(self) -> Any:
        """The client records go through (server or spool)."""
        return self._client(self.target)

    @property
    def remote(self) -> Any:
        """The server's client, whether or not this channel logs to it."""
        return self._client(self.uri)

    @property
    def deferred(self) -> bool:
        return not self.live

    def experiment(self, name: str) -> str:
        """The experiment's id in :attr:`target`, created if new."""
        if name not in self._experiments:
            self._experiments[name] = (experiment_id(self.remote, name, self.uri) if self.live
                                       else self.spool.experiment_id(name))
        return self._experiments[name]

    def create_run(self, experiment: str, tags: Mapping[str, str], run_name: str) -> str:
        if not self.live:
            return self.spool.create_run(experiment, {**tags, DEFERRED_TAG: "true"}, run_name)
        return self.client.create_run(self.experiment(experiment), tags=dict(tags),
                                      run_name=run_name).info.run_id

    def parent(self, experiment: str, pid: str, tags: Mapping[str, str], run_name: str,
               params: Mapping[str, Any] | None = None) -> str:
        """Find the parent run of pipeline execution ``pid``, or create it (with the full
        ``params``): the stages of one execution, and spool replay, share it."""
        query = f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{ROLE_TAG}` = 'pipeline'"
        found = self.client.search_runs([self.experiment(experiment)], query, max_results=1)
        if found:
            return found[0].info.run_id
        run_id = self.create_run(experiment, {**tags, ROLE_TAG: "pipeline", PIPELINE_TAG: pid},
                                 run_name)
        self.client.log_batch(run_id, params=param_items(params or {}))
        return run_id

    def resolve(self, record: lineage.Lineage) -> str:
        """The server run id behind a lineage record (looked up if it was deferred)."""
        if record.run_id:
            return record.run_id
        if record.spool_run_id and self.live:
            found = self.client.search_runs(
                [self.experiment(record.experiment)],
                f"tags.`{SPOOL_RUN_TAG}` = '{record.spool_run_id}'", max_results=1)
            if found:
                return found[0].info.run_id
        return f"spool:{record.spool_run_id}"

    def replay_pending(self, strict: bool) -> ReplayReport:
        """Send spooled runs to the server. ``strict``: let errors out (``sync-tracking``)."""
        if not self.spool.pending():
            return ReplayReport()
        try:
            report = self.spool.replay(self.remote, self.experiment, self.parent)
        except Exception as exc:
            if strict:
                raise
            log.warning("could not replay the tracking spool yet: %s", exc)
            return ReplayReport()
        log.info("tracking spool: %s", report)
        return report


def experiment_id(client: Any, name: str, uri: str | None = None) -> str:
    """The experiment's id, created (tagged as model training, not GenAI) if new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():  # an experiment made before the tag
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(
            uri or tracking_uri()), tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by another stage
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id
