"""The ``prune`` stage: structured channel pruning of the distilled student, then recovery.

Whole channels go, not single weights, so the network is genuinely smaller and
faster on a CPU (a sparse weight matrix is neither without special kernels).
torch-pruning builds the dependency graph (a residual add ties the channels of
the layers it joins, so they are pruned together), ranks channel groups by L2
magnitude and removes ``prune.ratio`` of every prunable layer's channels; the
classifier head keeps its outputs. The pruned student then recovers with a
short distillation from the teacher: the ``distill`` stage's task and loss
(:class:`~refinery.stages.distill.DistillTask`), on the shared engine, with
its own schedule (``prune.*``).

``prune.ratio: 0`` copies the student (no training), so the default can
choose without changing the pipeline's shape; ``quantize`` takes this
stage's model either way. The pruned model is saved like any other (a
``weights_only`` state dict and ``config.json`` with ``pruned: true``:
:func:`refinery.models.load_model` reads the layer widths from the state).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from refinery import models, paths, stage
from refinery.engine import (
    Checkpointer,
    DeviceData,
    MetricSink,
    Trainer,
    TrainSpec,
    fingerprint,
    make_runtime,
)
from refinery.engine.schedule import for_section
from refinery.errors import RefineryError
from refinery.formats.policies import load_policies
from refinery.formats.prepared import load_prepared
from refinery.params import EngineParams, Params, PruneParams
from refinery.pipeline import model_row, stage_named
from refinery.scoring import accuracy
from refinery.stages.distill import UNLABELED, DistillTask
from refinery.training import TrainingFiles, TrainResult, finish_training, run_model

log = logging.getLogger(__name__)


def prune_channels(model: models.ImageClassifier, ratio: float) -> models.ImageClassifier:
    """Remove ``ratio`` of the channels of every prunable layer (in place; returned)."""
    import torch_pruning as tp

    config = model.config
    example = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
    was_training = model.training
    model.eval()  # trace with running statistics: batch norm on one image is undefined
    tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=ratio, ignored_layers=[model.head]).step()
    model.train(was_training)
    model.config = dataclasses.replace(config, pruned=True)
    return model


def prune(p: PruneParams, *, engine_p: EngineParams, seed: int, student_dir: Path,
          teacher_dir: Path, files: TrainingFiles,
          sink: MetricSink | None = None) -> TrainResult:
    """Prune ``student_dir``'s model, recover it by distillation; write ``files.out_dir``."""
    rt = make_runtime(engine_p, seed)
    data = load_prepared(files.prepared_dir, splits=("train", "val"))
    for folder, what in ((student_dir, "distilled student"), (teacher_dir, "teacher")):
        if not (folder / "model.pt").exists():
            raise RefineryError(f"prune needs the {what} in {folder}")
    student = models.load_model(student_dir)
    before = models.parameter_count(student)
    val = DeviceData(data.val.images, None, rt), data.val.labels.to(rt.device)
    unpruned_acc = accuracy(run_model(student.to(rt.device), val[0], rt), val[1])
    if p.ratio == 0:
        log.info("prune.ratio is 0: the student is kept as it is")
        metrics = {"val_acc": unpruned_acc, "unpruned_val_acc": unpruned_acc, "ratio": 0.0,
                   "parameters": float(before), "unpruned_parameters": float(before),
                   "steps": 0.0}
        ckpt = Checkpointer(files.checkpoint_dir, "", enabled=False)
        return finish_training(rt, ckpt, student.cpu(), files=files, extra={"stage": "prune"},
                               history=[], curves={}, title="pruning (none)", metrics=metrics)
    prune_channels(student.cpu(), p.ratio)
    after = models.parameter_count(student)
    log.info("prune: %.0f%% of the channels removed, %d -> %d parameters (%.1fx fewer)",
             100 * p.ratio, before, after, before / after)
    supervised, _ = load_policies(files.policies)
    labels = torch.full((len(data.train),), UNLABELED, dtype=torch.int64)
    labels[data.labeled] = data.train.labels[data.labeled]
    task = DistillTask(student, models.load_model(teacher_dir), rt,
                       DeviceData(data.train.images, labels, rt), supervised, p.temperature,
                       p.alpha, val)
    schedule = for_section("prune", len(data.train), p, rt.world_size)
    if rt.is_main:
        schedule.report(log)
    spec = TrainSpec(stage="prune", schedule=schedule, seed=seed, eval_every=p.eval_every,
                     log_every=engine_p.log_every_steps,
                     checkpoint_every=engine_p.checkpoint_every_steps,
                     checkpoint_minutes=engine_p.checkpoint_every_minutes)
    ckpt = Checkpointer(files.checkpoint_dir, fingerprint(
        "prune", {"prune": p.model_dump(), "seed": seed, "world": rt.world_size},
        [files.prepared_dir / "meta.json", files.prepared_dir / "train.pt",
         files.prepared_dir / "labeled.pt", files.policies, student_dir / "model.pt",
         teacher_dir / "model.pt"]))
    outcome = Trainer(rt, task, spec, ckpt, sink).fit()
    final = outcome.final
    metrics = {
        "val_acc": final.get("val_acc", float("nan")),
        "unpruned_val_acc": unpruned_acc,
        "val_loss": final.get("val_loss", float("nan")),
        "train_loss": final.get("train_loss", float("nan")),
        "ratio": p.ratio,
        "parameters": float(after),
        "unpruned_parameters": float(before),
        "images_per_second": outcome.samples_per_second,
        "train_seconds": outcome.train_seconds,
        **schedule.metrics(),
        "resumed_at_step": outcome.resumed_at_step,
        "tracking_seconds": outcome.tracking_seconds,
    }
    model: nn.Module = task.model
    return finish_training(
        rt, ckpt, model, files=files, extra={"stage": "prune"}, history=outcome.history,
        curves={"loss": ["train_loss", "train_kd", "val_loss"], "accuracy": ["val_acc"],
                "learning rate": ["lr"]},
        title=f"pruning {100 * p.ratio:.0f}% of the channels, then recovery",
        metrics=metrics, warnings=schedule.warnings)


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery prune``."""
    declared = stage_named("prune")
    row = model_row("student_pruned")
    with stage.tracked(declared, params) as run:
        stage.check_plan(params)
        result = prune(params.prune, engine_p=params.engine, seed=params.seed,
                       student_dir=row.source_path,
                       teacher_dir=paths.TEACHER, sink=run,
                       files=TrainingFiles.for_stage(declared.name, row.path))
        stage.finish(declared, run, result.metrics(), warnings=result.warnings,
                     artifacts=[declared.reports / "curves.png", row.path / "config.json"])
