"""Supervised training of the teacher on the labeled subset only.

``init: pretrained`` starts from the SimCLR backbone: full fine-tuning (with an
optional lower backbone learning rate), a linear probe on frozen features, or
LP-FT (Kumar et al., 2022): the head is first fitted to the frozen features,
so full fine-tuning starts from a head that agrees with the backbone instead
of a random one whose gradients would scramble what pretraining learned;
``init: scratch`` trains the same network from random weights on the same
labels, the baseline that says what pretraining bought.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Literal

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
from refinery.formats.prepared import PreparedData, load_prepared
from refinery.params import EngineParams, FinetuneParams, ModelParams, Params
from refinery.pipeline import stage_named
from refinery.probe import Probe, fit_probe
from refinery.scoring import accuracy
from refinery.training import TrainingFiles, TrainResult, finish_training, run_model

log = logging.getLogger(__name__)

Init = Literal["pretrained", "scratch"]


class ClassifierTask:
    """Cross-entropy on augmented labeled images (MixUp/CutMix give soft targets)."""

    def __init__(self, model: models.ImageClassifier, rt: Runtime, train: DeviceData,
                 policy: SupervisedPolicy, label_smoothing: float, num_classes: int,
                 monitors: dict[str, tuple[DeviceData, torch.Tensor]],
                 frozen_backbone: bool = False) -> None:
        self.model = model
        self.rt = rt
        self.train = train
        self.policy = policy
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.monitors = monitors
        self.frozen_backbone = frozen_backbone
        # With engine.compile the augmentation and the loss compile beside the model.
        self._augment = rt.maybe_compile(self._make_batch)
        self._loss = rt.maybe_compile(self._cross_entropy)

    @property
    def index_device(self) -> torch.device:
        return self.train.index_device

    def num_samples(self) -> int:
        return len(self.train)

    def _make_batch(self, images: torch.Tensor, labels: torch.Tensor, params: SupervisedParams
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.policy.mix(self.policy.apply(images, params), labels, params)
        if self.rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        hard = targets if targets.ndim == 1 else targets.argmax(dim=1)
        return loss, (logits.argmax(dim=1) == hard).float().mean()

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.frozen_backbone:
            models.unwrap(model).backbone.eval()  # a linear probe keeps BN statistics fixed
        params = self.policy.sample(len(batch.indices), generator, self.rt.device)[batch.local]
        local = batch.local_indices
        images, targets = self._augment(self.train.images(local), self.train.labels(local),
                                        params)
        loss, acc = self._loss(model(images), targets)
        return loss, {"acc": acc}

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, (data, labels) in self.monitors.items():
            logits = run_model(model, data, self.rt)
            metrics[f"{name}_acc"] = accuracy(logits, labels)
            metrics[f"{name}_loss"] = float(F.cross_entropy(logits, labels.to(logits.device)))
        return metrics



def build_classifier(data: PreparedData, model_p: ModelParams, init: Init,
                     pretrained_dir: Path | None) -> models.ImageClassifier:
    """The teacher network, from the pretrained backbone or from random weights."""
    if init == "scratch":
        config = models.ModelConfig(
            arch=models.teacher_arch(model_p.teacher.arch, data.size), stem=model_p.teacher.stem,
            in_channels=data.channels,
            image_size=data.size, num_classes=0, mean=tuple(data.mean), std=tuple(data.std))
        return models.build_model(config.with_classes(data.classes))
    if pretrained_dir is None or not (pretrained_dir / "model.pt").exists():
        raise RefineryError(f"finetune with init: pretrained needs a pretrained backbone in "
                            f"{pretrained_dir} (run the pretrain stage first)")
    encoder_config = models.load_config(pretrained_dir)
    if (encoder_config.in_channels, encoder_config.image_size) != (data.channels, data.size):
        raise RefineryError(
            f"pretrained backbone expects {encoder_config.in_channels}x{encoder_config.image_size}"
            f" images but the prepared data is {data.channels}x{data.size}; rerun pretrain")
    model = models.build_model(encoder_config.with_classes(data.classes))
    state = torch.load(pretrained_dir / "model.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith("head.") for key in missing):
        raise RefineryError(f"pretrained weights do not fit the teacher: missing {missing}, "
                            f"unexpected {unexpected}")
    return model


def fit_head(model: models.ImageClassifier, images: torch.Tensor, labels: torch.Tensor,
             val_images: torch.Tensor, val_labels: torch.Tensor) -> Probe:
    """LP-FT's first step: the linear head on the frozen backbone's features of the labeled
    images (no augmentation, BN in eval mode), its L2 penalty chosen on val
    (:func:`refinery.probe.fit_probe`), copied into the head. Deterministic."""
    head = model.head
    if not isinstance(head, nn.Linear):
        raise RefineryError("finetune.mode: lpft needs a linear head")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        train, val = ([torch.cat([model.features(split[i:i + 256].float().div(255)).float()
                                  for i in range(0, len(split), 256)])
                       for split in (images, val_images)])
    probe = fit_probe(train, labels, val, val_labels, head.out_features)
    with torch.no_grad():
        head.weight.copy_(probe.weight.to(head.weight))
        head.bias.copy_(probe.bias.to(head.bias))
    model.train(was_training)
    return probe


def finetune(p: FinetuneParams, *, model_p: ModelParams, engine_p: EngineParams, seed: int,
             init: Init, files: TrainingFiles, pretrained_dir: Path | None = None,
             sink: MetricSink | None = None, monitor_test: bool = False) -> TrainResult:
    """Train a classifier on the labeled subset; write it to ``files.out_dir``.

    ``monitor_test`` also scores the test split every evaluation (benchmarks use it
    for time-to-accuracy; the pipeline leaves the test split to ``evaluate``).
    """
    rt = make_runtime(engine_p, seed)
    data = load_prepared(files.prepared_dir, splits=("train", "val", "test") if monitor_test
                         else ("train", "val"))
    supervised, _ = load_policies(files.policies)
    model = build_classifier(data, model_p, init, pretrained_dir)
    linear = p.mode == "linear"
    if linear:
        if init == "scratch":
            raise RefineryError("finetune.mode: linear needs init: pretrained (a linear probe on "
                                "random features measures nothing)")
        for param in model.backbone.parameters():
            param.requires_grad_(False)
    labeled = data.labeled
    probe = None
    if p.mode == "lpft" and init == "pretrained":
        probe = fit_head(model, data.train.images[labeled], data.train.labels[labeled],
                         data.val.images, data.val.labels)
        log.info("finetune: LP-FT head fitted on frozen features: L2 %g chosen on val, "
                 "train acc %.4f, val acc %.4f", probe.l2, probe.train_acc, probe.val_acc)
    monitors = {"val": (DeviceData(data.val.images, None, rt), data.val.labels.to(rt.device))}
    if monitor_test:
        monitors["test"] = (DeviceData(data.test.images, None, rt),
                            data.test.labels.to(rt.device))
    task = ClassifierTask(
        model, rt, DeviceData(data.train.images[labeled], data.train.labels[labeled], rt),
        supervised, p.label_smoothing, data.num_classes, monitors, frozen_backbone=linear)
    stage = "finetune" if init == "pretrained" else "finetune_scratch"
    scales = {} if linear or p.backbone_lr_scale == 1.0 or init == "scratch" else {
        "backbone.": p.backbone_lr_scale}
    schedule = for_section("finetune", len(labeled), p, rt.world_size)
    if rt.is_main:
        schedule.report(log)
    spec = TrainSpec(stage=stage, schedule=schedule, seed=seed,
                     eval_every=p.eval_every, log_every=engine_p.log_every_steps,
                     checkpoint_every=engine_p.checkpoint_every_steps,
                     checkpoint_minutes=engine_p.checkpoint_every_minutes, group_lr_scales=scales)
    inputs = [files.prepared_dir / "meta.json", files.prepared_dir / "train.pt",
              files.prepared_dir / "labeled.pt", files.policies]
    if init == "pretrained" and pretrained_dir is not None:
        inputs.append(pretrained_dir / "model.pt")
    ckpt = Checkpointer(files.checkpoint_dir, fingerprint(
        stage, {"finetune": p.model_dump(), "model": model_p.model_dump(), "seed": seed,
                "init": init, "world": rt.world_size, "monitor_test": monitor_test}, inputs))
    outcome = Trainer(rt, task, spec, ckpt, sink).fit()
    final = outcome.final
    metrics = {
        "val_acc": final.get("val_acc", float("nan")),
        "val_loss": final.get("val_loss", float("nan")),
        "train_loss": final.get("train_loss", float("nan")),
        "labeled_images": len(labeled),
        "images_per_second": outcome.samples_per_second,
        "train_seconds": outcome.train_seconds,
        "warmup_seconds": outcome.warmup_seconds,
        **schedule.metrics(),
        "resumed_at_step": outcome.resumed_at_step,
        "parameters": models.parameter_count(model),
        "tracking_seconds": outcome.tracking_seconds,
    }
    if monitor_test:
        metrics["test_acc"] = final.get("test_acc", float("nan"))
    if probe is not None:
        metrics.update(lpft_head_train_acc=probe.train_acc, lpft_head_val_acc=probe.val_acc,
                       lpft_head_l2=probe.l2)
    return finish_training(
        rt, ckpt, task.model, files=files, extra={"stage": stage, "init": init},
        history=outcome.history,
        curves={"loss": ["train_loss", "val_loss"],
                "accuracy": ["train_acc", "val_acc", "test_acc"], "learning rate": ["lr"]},
        title=f"fine-tuning ({init})", metrics=metrics, warnings=schedule.warnings)


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery finetune --init ...``,
    the teacher (``finetune``) or the scratch baseline (``finetune_scratch``)."""
    init = args.init
    declared = stage_named("finetune" if init == "pretrained" else "finetune_scratch")
    out = paths.TEACHER if init == "pretrained" else paths.SCRATCH
    with stage.tracked(declared, params) as run:
        stage.check_plan(params)
        result = finetune(params.finetune, model_p=params.model, engine_p=params.engine,
                          seed=params.seed, init=init, sink=run,
                          pretrained_dir=paths.PRETRAINED if init == "pretrained" else None,
                          files=TrainingFiles.for_stage(declared.name, out))
        stage.finish(declared, run, result.metrics(), warnings=result.warnings,
                     artifacts=[declared.reports / "curves.png", out / "config.json"])
