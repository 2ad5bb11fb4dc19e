"""The one list of pipeline stages, and the thin adapter of each.

An adapter loads nothing itself: it opens the stage's MLflow run, calls the
plain stage function with typed params and paths, writes the stage's metrics
file for DVC and logs the same numbers to MLflow. ``dvc.yaml`` and the
Prefect flow are checked against :data:`STAGES` by the tests.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from refinery import fsutil, paths
from refinery.params import Params

Adapter = Callable[[Params, argparse.Namespace], None]


@dataclass(frozen=True)
class Stage:
    name: str  # the DVC stage name
    command: str  # the CLI sub-command (several DVC stages may share one)
    help: str
    params: tuple[str, ...]  # params keys the stage reads; dvc.yaml lists exactly these
    run: Adapter
    cli_args: tuple[str, ...] = ()  # fixed CLI arguments of this DVC stage
    arguments: tuple[tuple[str, dict[str, Any]], ...] = field(default=())


def params_subset(params: Params, keys: tuple[str, ...]) -> dict[str, Any]:
    """The part of the params a stage reads, as nested dicts (for logging)."""
    full = params.to_dict()
    subset: dict[str, Any] = {}
    for key in keys:
        node: Any = full
        for part in key.split("."):
            node = node[part]
        subset[key] = node
    return subset


def _finish(stage: str, run: Any, metrics: Mapping[str, float]) -> None:
    fsutil.write_json(paths.metrics_file(stage), dict(metrics))
    run.log_metrics(metrics)


def _tracked(stage: Stage, params: Params) -> Any:
    from refinery import tracking

    return tracking.stage_run(
        stage.name, params_subset(params, stage.params), experiment=params.tracking.experiment
    )


# ----------------------------------------------------------------------- adapters


def _download(params: Params, args: argparse.Namespace) -> None:
    from refinery.data.download import download

    stage = stage_named("download")
    with _tracked(stage, params) as run:
        result = download(params.download, out_dir=paths.RAW, cache_dir=paths.DOWNLOAD_CACHE,
                          seed=params.seed)
        run.set_tags({"refinery.source": result.source, "refinery.source_sha256": result.sha256})
        run.log_artifact(paths.RAW / "dataset.json")
        _finish(stage.name, run, result.metrics())


def _validate(params: Params, args: argparse.Namespace) -> None:
    from refinery.data.validate import validate

    stage = stage_named("validate")
    with _tracked(stage, params) as run:
        result = validate(
            params.validate_params,
            params.images,
            raw_dir=paths.RAW,
            manifest_path=paths.MANIFEST,
            reports_dir=paths.reports_dir("validate"),
        )
        run.log_artifacts(paths.reports_dir("validate"), "validation")
        _finish(stage.name, run, result.metrics())
        result.raise_if_failed()


def _prepare(params: Params, args: argparse.Namespace) -> None:
    from refinery.data.prepare import prepare

    stage = stage_named("prepare")
    with _tracked(stage, params) as run:
        result = prepare(
            params.prepare,
            params.images,
            seed=params.seed,
            raw_dir=paths.RAW,
            manifest_path=paths.MANIFEST,
            out_dir=paths.PREPARED,
        )
        run.log_artifact(paths.PREPARED / "meta.json")
        _finish(stage.name, run, result.metrics())


STAGES: tuple[Stage, ...] = (
    Stage(
        "download",
        "download",
        "fetch the source (builtin, CIFAR-10 binary, image-folder archive) into data/raw",
        ("seed", "download"),
        _download,
    ),
    Stage(
        "validate",
        "validate",
        "build the image manifest and check it with Great Expectations",
        ("images", "validate"),
        _validate,
    ),
    Stage(
        "prepare",
        "prepare",
        "split train/val, pick the labeled subset, pack uint8 tensors",
        ("seed", "images", "prepare"),
        _prepare,
    ),
)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(name)


def stage_for_command(command: str) -> Stage:
    for stage in STAGES:
        if stage.command == command:
            return stage
    raise KeyError(command)
