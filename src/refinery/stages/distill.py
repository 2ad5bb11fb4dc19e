"""Knowledge distillation: the fine-tuned teacher teaches the small student.

Loss per image (Hinton et al. 2015)::

    labeled:    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)
    unlabeled:  alpha * T^2 * KL(teacher_T || student_T)

Teacher and student see the *same* augmented view ("function matching", Beyer
et al. 2022), so the student learns the teacher's function, not just its
answers on clean images. The unlabeled pool (train images outside the labeled
subset) reaches the small model only through the KD term: this is how the
unlabeled data pays off.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refinery import models, paths, stage
from refinery.augment import SupervisedPolicy
from refinery.augment.supervised import SupervisedParams
from refinery.engine import (
    Batch,
    Checkpointer,
    DeviceData,
    MetricSink,
    Trainer,
    TrainSpec,
    fingerprint,
    make_runtime,
)
from refinery.engine.runtime import Runtime
from refinery.engine.schedule import for_section
from refinery.errors import RefineryError
from refinery.formats.policies import load_policies
from refinery.formats.prepared import load_prepared
from refinery.params import DistillParams, EngineParams, ModelParams, Params
from refinery.pipeline import stage_named
from refinery.scoring import accuracy
from refinery.training import TrainingFiles, TrainResult, finish_training, run_model

log = logging.getLogger(__name__)

UNLABELED = -1


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean KD loss over the batch; ``labels == -1`` marks unlabeled images (KD term only)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kd = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1) * (t * t)
    labeled = labels != UNLABELED
    # every image's cross-entropy against a clamped label, then masked: no host sync
    # (``labeled.any()`` and boolean indexing each wait for the device)
    ce = F.cross_entropy(student_logits.float(), labels.clamp_min(0), reduction="none")
    per_image = alpha * kd + (1 - alpha) * ce * labeled.float()
    return per_image.mean(), {"kd": kd.mean().detach(),
                              "labeled_share": labeled.float().mean().detach()}


class DistillTask:
    def __init__(self, student: models.ImageClassifier, teacher: models.ImageClassifier,
                 rt: Runtime, train: DeviceData, policy: SupervisedPolicy, temperature: float,
                 alpha: float, val: tuple[DeviceData, torch.Tensor]) -> None:
        self.model = student
        self.teacher = teacher.to(rt.device).eval()
        if rt.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.rt = rt
        self.train = train
        self.policy = policy
        self.temperature, self.alpha = temperature, alpha
        self.val = val
        # With engine.compile the augmentation, the teacher and the loss compile too.
        self._augment = rt.maybe_compile(self._make_batch)
        self._teacher = rt.maybe_compile(self.teacher)
        self._loss = rt.maybe_compile(kd_loss)

    @property
    def index_device(self) -> torch.device:
        return self.train.index_device

    def num_samples(self) -> int:
        return len(self.train)

    def _make_batch(self, images: torch.Tensor, params: SupervisedParams) -> torch.Tensor:
        images = self.policy.apply(images, params)
        if self.rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        params = self.policy.sample(len(batch.indices), generator, self.rt.device)
        local = batch.local_indices
        images = self._augment(self.train.images(local), params[batch.local])
        with torch.no_grad():
            teacher_logits = self._teacher(images)
        loss, metrics = self._loss(model(images), teacher_logits, self.train.labels(local),
                                   self.temperature, self.alpha)
        return loss, metrics

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        data, labels = self.val
        logits = run_model(model, data, self.rt)
        return {"val_acc": accuracy(logits, labels),
                "val_loss": float(F.cross_entropy(logits, labels.to(logits.device)))}



def distill(p: DistillParams, *, model_p: ModelParams, engine_p: EngineParams, seed: int,
            teacher_dir: Path, files: TrainingFiles,
            sink: MetricSink | None = None) -> TrainResult:
    """Distill ``teacher_dir``'s model into a student; write it to ``files.out_dir``."""
    rt = make_runtime(engine_p, seed)
    data = load_prepared(files.prepared_dir, splits=("train", "val"))
    if not (teacher_dir / "model.pt").exists():
        raise RefineryError(f"distill needs the fine-tuned teacher in {teacher_dir}")
    teacher = models.load_model(teacher_dir)
    if teacher.config.classes != tuple(data.classes):
        raise RefineryError("the teacher was trained on other classes than the prepared data; "
                            "rerun finetune")
    supervised, _ = load_policies(files.policies)
    student = models.build_model(models.ModelConfig(
        arch="student", in_channels=data.channels, image_size=data.size,
        num_classes=data.num_classes, classes=tuple(data.classes), mean=tuple(data.mean),
        std=tuple(data.std), width=model_p.student.width, depth=model_p.student.depth,
        stem="small"))  # full resolution: the student's cost is set by width and depth
    labels = torch.full((len(data.train),), UNLABELED, dtype=torch.int64)
    labels[data.labeled] = data.train.labels[data.labeled]
    rows = torch.arange(len(data.train)) if p.use_unlabeled else data.labeled
    task = DistillTask(
        student, teacher, rt, DeviceData(data.train.images[rows], labels[rows], rt), supervised,
        p.temperature, p.alpha, (DeviceData(data.val.images, None, rt),
                                 data.val.labels.to(rt.device)))
    schedule = for_section("distill", len(rows), p, rt.world_size)
    if rt.is_main:
        schedule.report(log)
    spec = TrainSpec(stage="distill", schedule=schedule, seed=seed, eval_every=p.eval_every,
                     log_every=engine_p.log_every_steps,
                     checkpoint_every=engine_p.checkpoint_every_steps,
                     checkpoint_minutes=engine_p.checkpoint_every_minutes)
    ckpt = Checkpointer(files.checkpoint_dir, fingerprint(
        "distill", {"distill": p.model_dump(), "student": model_p.student.model_dump(),
                    "seed": seed, "world": rt.world_size},
        [files.prepared_dir / "meta.json", files.prepared_dir / "train.pt",
         files.prepared_dir / "labeled.pt", files.policies, teacher_dir / "model.pt"]))
    outcome = Trainer(rt, task, spec, ckpt, sink).fit()
    final = outcome.final
    teacher_val = accuracy(run_model(task.teacher, DeviceData(data.val.images, None, rt), rt),
                           data.val.labels)
    metrics = {
        "val_acc": final.get("val_acc", float("nan")),
        "teacher_val_acc": teacher_val,
        "val_loss": final.get("val_loss", float("nan")),
        "train_loss": final.get("train_loss", float("nan")),
        "train_images": len(rows),
        "unlabeled_images": int((labels[rows] == UNLABELED).sum()),
        "student_parameters": models.parameter_count(student),
        "teacher_parameters": models.parameter_count(teacher),
        "images_per_second": outcome.samples_per_second,
        "train_seconds": outcome.train_seconds,
        **schedule.metrics(),
        "resumed_at_step": outcome.resumed_at_step,
        "tracking_seconds": outcome.tracking_seconds,
    }
    return finish_training(
        rt, ckpt, task.model, files=files, extra={"stage": "distill"}, history=outcome.history,
        curves={"loss": ["train_loss", "train_kd", "val_loss"], "accuracy": ["val_acc"],
                "learning rate": ["lr"]},
        title="distillation", metrics=metrics, warnings=schedule.warnings)


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery distill``."""
    declared = stage_named("distill")
    with stage.tracked(declared, params) as run:
        stage.check_plan(params)
        result = distill(params.distill, model_p=params.model, engine_p=params.engine,
                         seed=params.seed, teacher_dir=paths.TEACHER, sink=run,
                         files=TrainingFiles.for_stage(declared.name, paths.STUDENT))
        stage.finish(declared, run, result.metrics(), warnings=result.warnings,
                     artifacts=[declared.reports / "curves.png", paths.STUDENT / "config.json"])
