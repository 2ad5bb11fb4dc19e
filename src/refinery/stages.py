"""The one list of pipeline stages, and the thin adapter of each.

An adapter loads nothing itself: it opens the stage's MLflow run, calls the
plain stage function with typed params and paths, writes the stage's metrics
file for DVC and logs the same numbers to MLflow. ``dvc.yaml`` and the
Prefect flow are checked against :data:`STAGES` by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
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
    #: the few numbers a person compares between experiments: what ``metrics/<stage>.json``
    #: (``dvc metrics``) holds; everything else goes to ``reports/<stage>/details.json``
    headline: tuple[str, ...] = ()
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
    """Every number to MLflow and ``reports/<stage>/details.json``; the headline to DVC."""
    headline = stage_named(stage).headline
    fsutil.write_json(paths.details_file(stage), dict(metrics))
    fsutil.write_json(paths.metrics_file(stage), {key: metrics[key] for key in headline})
    run.log_metrics(metrics)


def _tracked(stage: Stage, params: Params) -> Any:
    """The stage's MLflow run; under torchrun only rank 0 tracks, the others get a no-op."""
    from refinery import tracking
    from refinery.engine.runtime import is_main_process

    if not is_main_process():
        return contextlib.nullcontext(tracking.NullRun())
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
            pixels_path=paths.PIXELS,
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
            pixels_path=paths.PIXELS,
            check=lambda meta: _checked_plan(params, run, meta),
        )
        run.log_artifact(paths.PREPARED / "meta.json")
        _finish(stage.name, run, result.metrics())


def _augment(params: Params, args: argparse.Namespace) -> None:
    from refinery.augment import augment

    stage = stage_named("augment")
    with _tracked(stage, params) as run:
        result = augment(params.augment, prepared_dir=paths.PREPARED, out_dir=paths.AUGMENT,
                         seed=params.seed)
        run.log_artifact(result.policies_path)
        run.log_artifact(result.preview_path)
        _finish(stage.name, run, result.metrics())


def _pretrain(params: Params, args: argparse.Namespace) -> None:
    from refinery.training.pretrain import pretrain

    stage = stage_named("pretrain")
    with _tracked(stage, params) as run:
        _checked_plan(params)
        result = pretrain(
            params.pretrain, params.model, params.engine, params.seed,
            prepared_dir=paths.PREPARED, policies_path=paths.AUGMENT / "policies.json",
            out_dir=paths.PRETRAINED, checkpoint_dir=paths.CHECKPOINTS / stage.name,
            plots_csv=paths.PLOTS / "pretrain.csv",
            curves_png=paths.reports_dir("pretrain") / "curves.png", sink=run,
        )
        _finish_main(stage.name, run, result.metrics(), warnings=result.warnings,
                     artifacts=[paths.reports_dir("pretrain") / "curves.png",
                                paths.PRETRAINED / "config.json"])


def _finetune(params: Params, args: argparse.Namespace) -> None:
    from refinery.training.finetune import finetune

    init = args.init
    stage = stage_named("finetune" if init == "pretrained" else "finetune_scratch")
    out = paths.TEACHER if init == "pretrained" else paths.SCRATCH
    with _tracked(stage, params) as run:
        _checked_plan(params)
        result = finetune(
            params.finetune, params.model, params.engine, params.seed, init=init,
            prepared_dir=paths.PREPARED, policies_path=paths.AUGMENT / "policies.json",
            pretrained_dir=paths.PRETRAINED if init == "pretrained" else None,
            out_dir=out, checkpoint_dir=paths.CHECKPOINTS / stage.name,
            plots_csv=paths.PLOTS / f"{stage.name}.csv",
            curves_png=paths.reports_dir(stage.name) / "curves.png", sink=run,
        )
        _finish_main(stage.name, run, result.metrics(), warnings=result.warnings,
                     artifacts=[paths.reports_dir(stage.name) / "curves.png",
                                out / "config.json"])


def _distill(params: Params, args: argparse.Namespace) -> None:
    from refinery.training.distill import distill

    stage = stage_named("distill")
    with _tracked(stage, params) as run:
        _checked_plan(params)
        result = distill(
            params.distill, params.model, params.engine, params.seed,
            prepared_dir=paths.PREPARED, policies_path=paths.AUGMENT / "policies.json",
            teacher_dir=paths.TEACHER, out_dir=paths.STUDENT,
            checkpoint_dir=paths.CHECKPOINTS / stage.name,
            plots_csv=paths.PLOTS / "distill.csv",
            curves_png=paths.reports_dir("distill") / "curves.png", sink=run,
        )
        _finish_main(stage.name, run, result.metrics(), warnings=result.warnings,
                     artifacts=[paths.reports_dir("distill") / "curves.png",
                                paths.STUDENT / "config.json"])


def _quantize(params: Params, args: argparse.Namespace) -> None:
    from refinery.quantize import quantize_student

    stage = stage_named("quantize")
    with _tracked(stage, params) as run:
        result = quantize_student(params.quantize, params.seed, prepared_dir=paths.PREPARED,
                                  student_dir=paths.STUDENT, out_dir=paths.STUDENT_INT8)
        run.log_artifact(paths.STUDENT_INT8 / "meta.json")
        _finish(stage.name, run, result.metrics())


def _evaluate(params: Params, args: argparse.Namespace) -> None:
    from refinery import models, registry, tracking
    from refinery.data.prepared import dataset_identity, load_split
    from refinery.evaluation.stage import evaluate

    stage = stage_named("evaluate")
    report_dir = paths.reports_dir("evaluate")
    int8 = paths.STUDENT_INT8 / "model.pt2"
    with _tracked(stage, params) as run:
        result = evaluate(
            params.evaluate, params.seed, prepared_dir=paths.PREPARED,
            model_dirs={"scratch": paths.SCRATCH, "teacher": paths.TEACHER,
                        "student": paths.STUDENT},
            int8_path=int8, out_dir=report_dir, plots_dir=paths.PLOTS / "evaluate")
        metrics = result.metrics()
        fsutil.write_json(paths.details_file(stage.name), metrics)
        fsutil.write_json(paths.EVALUATION_METRICS, {
            model: {key: values[key] for key in stage.headline if key in values}
            for model, values in metrics.items()})
        run.log_metrics(tracking.flatten(metrics))
        test = load_split(paths.PREPARED / "test.pt")
        int8_report = result.reports["student_int8"]
        registry.register(
            run, params.registry, models.load_model(paths.TEACHER), int8,
            example=(test.images[:2].float() / 255).numpy(),
            candidate=registry.Candidate(
                accuracy=int8_report.accuracy,
                latency_p50_ms=int8_report.cost.latency.p50_ms,
                teacher_accuracy=result.reports["teacher"].accuracy,
                dataset=dataset_identity(paths.PREPARED)),
            tags={"mlflow_run_id": run.run_id},
            out_file=report_dir / "registry.json")
        run.log_artifacts(report_dir, "evaluation")


def _checked_plan(params: Params, run: Any = None, meta: Any = None) -> None:
    """The whole training plan against the prepared data (``refinery.plan``): raise
    before any work if it cannot run. With ``run`` (prepare), also log every stage's
    resolved schedule and tag the run with the warnings."""
    from refinery.engine.runtime import env_world_size, is_main_process
    from refinery.plan import check_plan, check_prepared

    plan = (check_plan(params, meta, env_world_size()) if meta is not None
            else check_prepared(params, paths.PREPARED, env_world_size()))
    if plan is None or run is None or not is_main_process():
        return
    plan.report()
    if plan.warnings:
        run.set_tags({"refinery.warnings": "; ".join(plan.warnings)[:5000]})


def _finish_main(stage: str, run: Any, metrics: Mapping[str, float],
                 artifacts: list[Any] = (), warnings: tuple[str, ...] = ()) -> None:
    """Like :func:`_finish`, on rank 0 only (the others wrote nothing); the stage's
    warnings (e.g. too few optimizer steps) become a tag on its run."""
    from refinery.engine.runtime import is_main_process

    if not is_main_process():
        return
    if warnings:
        run.set_tags({"refinery.warnings": "; ".join(warnings)[:5000]})
    for artifact in artifacts:
        run.log_artifact(artifact)
    _finish(stage, run, metrics)


_INIT_ARGUMENT = (("--init", {"choices": ["pretrained", "scratch"], "default": "pretrained",
                              "help": "start from the pretrained backbone or from scratch"}),)
_TRAIN_KEYS = ("seed", "model.teacher", "engine")

STAGES: tuple[Stage, ...] = (
    Stage(
        "download",
        "download",
        "fetch the source (builtin, CIFAR-10 binary, image-folder archive) into data/raw",
        ("seed", "download"),
        _download,
        ("train_records", "test_records", "classes"),
    ),
    Stage(
        "validate",
        "validate",
        "build the image manifest and check it with Great Expectations",
        ("images", "validate"),
        _validate,
        ("rows", "failed_expectations"),
    ),
    Stage(
        "prepare",
        "prepare",
        "split train/val, pick the labeled subset, pack uint8 tensors",
        ("seed", "images", "prepare"),
        _prepare,
        ("train_images", "labeled_images"),
    ),
    Stage(
        "augment",
        "augment",
        "resolve the augmentation policies against the prepared images; preview grid",
        ("seed", "augment"),
        _augment,
        ("ssl_view_gap", "supervised_change"),
    ),
    Stage(
        "pretrain",
        "pretrain",
        "self-supervised SimCLR pretraining of the teacher backbone (GPU when present)",
        (*_TRAIN_KEYS, "pretrain"),
        _pretrain,
        ("knn_acc", "steps"),
    ),
    Stage(
        "finetune",
        "finetune",
        "fine-tune the pretrained backbone on the labeled subset (the teacher)",
        (*_TRAIN_KEYS, "finetune"),
        _finetune,
        ("val_acc", "steps"),
        cli_args=("--init", "pretrained"),
        arguments=_INIT_ARGUMENT,
    ),
    Stage(
        "finetune_scratch",
        "finetune",
        "the same training from random weights: the baseline pretraining must beat",
        (*_TRAIN_KEYS, "finetune"),
        _finetune,
        ("val_acc", "steps"),
        cli_args=("--init", "scratch"),
        arguments=_INIT_ARGUMENT,
    ),
    Stage(
        "distill",
        "distill",
        "distill the teacher into the small student (labeled + unlabeled images)",
        ("seed", "model.student", "engine", "distill"),
        _distill,
        ("val_acc", "teacher_val_acc"),
    ),
    Stage(
        "quantize",
        "quantize",
        "int8 static quantization of the student (PT2E, x86), QAT if PTQ loses too much",
        ("seed", "quantize"),
        _quantize,
        ("int8_val_acc", "size_reduction"),
    ),
    Stage(
        "evaluate",
        "evaluate",
        "score every model on test (accuracy, calibration, robustness, cost); registry gate",
        ("seed", "evaluate", "registry"),
        _evaluate,
        ("accuracy", "macro_f1", "ece", "file_mb", "latency_p50_ms"),
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
