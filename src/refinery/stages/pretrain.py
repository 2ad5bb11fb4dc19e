"""Self-supervised pretraining (SimCLR): a backbone learns from unlabeled images.

Two augmented views of each image are pulled together and pushed apart from
every other image in the (global) batch by the NT-Xent loss. Labels are not
used for training; a kNN classifier on frozen features (labeled train subset
-> val) shows every few epochs whether the features are getting useful.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refinery import models, paths, stage
from refinery.augment import SslPolicy
from refinery.augment.selfsup import TwoViewParams
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
from refinery.errors import ParamsError
from refinery.formats.policies import load_policies
from refinery.formats.prepared import load_prepared
from refinery.params import EngineParams, ModelParams, Params, PretrainParams
from refinery.pipeline import stage_named
from refinery.training import (
    TrainingFiles,
    TrainResult,
    finish_training,
    knn_accuracy,
    run_model,
)

log = logging.getLogger(__name__)


class SimCLR(nn.Module):
    """Encoder (an :class:`ImageClassifier` without head) plus the projection MLP."""

    def __init__(self, encoder: models.ImageClassifier, hidden: int, out: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(
            nn.Linear(encoder.feature_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, rt: Runtime | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent over the global batch; returns (mean loss over local anchors, top-1 accuracy).

    Under DDP the projections of all ranks are gathered (with gradients), so each
    anchor sees the same 2B-2 negatives as in a single process.
    """
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    local = z1.shape[0]
    if rt is not None and rt.distributed:
        from torch.distributed.nn.functional import all_gather

        all1, all2 = torch.cat(all_gather(z1)), torch.cat(all_gather(z2))
        offset = rt.rank * local
    else:
        all1, all2, offset = z1, z2, 0
    total = all1.shape[0]
    bank = torch.cat([all1, all2])
    anchors = torch.cat([z1, z2])
    # The similarity matmul in fp32 even under bf16 autocast: at temperature 0.2 the
    # logits reach 5, where bf16's step is ~0.03 (a visible error in the loss and its
    # gradient); the (2B x 2B) matmul is a small share of the step's work.
    with torch.autocast(anchors.device.type, enabled=False):
        logits = anchors.float() @ bank.float().T / temperature
    rows = torch.arange(local, device=z1.device)
    self_idx = torch.cat([offset + rows, total + offset + rows])
    positive = torch.cat([total + offset + rows, offset + rows])
    logits = logits.scatter(1, self_idx[:, None], float("-inf"))
    loss = F.cross_entropy(logits, positive)
    accuracy = (logits.argmax(dim=1) == positive).float().mean()
    return loss, accuracy.detach()


class PretrainTask:
    def __init__(self, model: SimCLR, rt: Runtime, train: DeviceData, policy: SslPolicy,
                 temperature: float, knn_bank: DeviceData, knn_bank_labels: torch.Tensor,
                 knn_query: DeviceData, knn_query_labels: torch.Tensor, num_classes: int,
                 knn_k: int) -> None:
        self.model = model
        self.rt = rt
        self.train = train
        self.policy = policy
        self.temperature = temperature
        self.knn = (knn_bank, knn_bank_labels, knn_query, knn_query_labels)
        self.num_classes, self.knn_k = num_classes, knn_k
        # With engine.compile the augmentation (one graph, no breaks) and the loss compile
        # beside the model; the parameter draw stays eager (it reads the generator).
        self._views = rt.maybe_compile(self._make_views)
        self._loss = nt_xent if rt.distributed else rt.maybe_compile(nt_xent)

    @property
    def index_device(self) -> torch.device:
        return self.train.index_device

    def num_samples(self) -> int:
        return len(self.train)

    def _make_views(self, images: torch.Tensor, params: TwoViewParams) -> torch.Tensor:
        views = torch.cat(self.policy.apply(images, params))
        if self.rt.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        return views

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        params = self.policy.sample(len(batch.indices), generator, self.rt.device)
        views = self._views(self.train.images(batch.local_indices), params[batch.local])
        z1, z2 = model(views).chunk(2)
        if self.rt.distributed:
            loss, acc = self._loss(z1, z2, self.temperature, self.rt)
        else:
            loss, acc = self._loss(z1, z2, self.temperature)
        return loss, {"contrastive_acc": acc}

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        bank, bank_labels, query, query_labels = self.knn
        encoder = model.encoder
        return {"knn_acc": knn_accuracy(
            run_model(encoder, bank, self.rt, features=True), bank_labels,
            run_model(encoder, query, self.rt, features=True), query_labels,
            self.num_classes, k=self.knn_k)}



def pretrain(p: PretrainParams, *, model_p: ModelParams, engine_p: EngineParams, seed: int,
             files: TrainingFiles, sink: MetricSink | None = None,
             weights: Path | None = None) -> TrainResult:
    """Train the teacher backbone with SimCLR; write it to ``files.out_dir``.

    ``weights``: a verified state dict (``model.teacher.weights``, fetched by
    :func:`main`) to start from instead of random weights.
    """
    rt = make_runtime(engine_p, seed)
    data = load_prepared(files.prepared_dir, splits=("train", "val"))
    _, ssl_policy = load_policies(files.policies)
    config = models.ModelConfig(
        arch=models.teacher_arch(model_p.teacher.arch, data.size), stem=model_p.teacher.stem,
        in_channels=data.channels,
        image_size=data.size, num_classes=0, mean=tuple(data.mean), std=tuple(data.std))
    encoder = models.build_model(config)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            dropped = models.load_backbone_weights(encoder.backbone, state, weights.name)
        except ValueError as exc:
            raise ParamsError(str(exc)) from None
        log.info("pretrain: starting from %s (%d tensors; dropped its head: %s)", weights.name,
                 len(state) - len(dropped), ", ".join(dropped) or "none")
    net = SimCLR(encoder, p.projection_hidden, p.projection_dim)
    labeled = data.labeled
    schedule = for_section("pretrain", len(data.train), p, rt.world_size)
    if rt.is_main:
        schedule.report(log)
    task = PretrainTask(
        net, rt,
        train=DeviceData(data.train.images, None, rt),
        policy=ssl_policy,
        temperature=p.temperature,
        knn_bank=DeviceData(data.train.images[labeled], None, rt),
        knn_bank_labels=data.train.labels[labeled].to(rt.device),
        knn_query=DeviceData(data.val.images, None, rt),
        knn_query_labels=data.val.labels.to(rt.device),
        num_classes=data.num_classes, knn_k=p.knn_k,
    )
    spec = TrainSpec(stage="pretrain", schedule=schedule, seed=seed, eval_every=p.knn_every,
                     log_every=engine_p.log_every_steps,
                     checkpoint_every=engine_p.checkpoint_every_steps,
                     checkpoint_minutes=engine_p.checkpoint_every_minutes)
    ckpt = Checkpointer(files.checkpoint_dir, fingerprint(
        "pretrain", {"pretrain": p.model_dump(), "model": model_p.model_dump(), "seed": seed,
                     "world": rt.world_size},
        [files.prepared_dir / "meta.json", files.prepared_dir / "train.pt", files.policies,
         *([weights] if weights is not None else [])]))
    outcome = Trainer(rt, task, spec, ckpt, sink).fit()
    final = outcome.final
    metrics = {
        "knn_acc": final.get("knn_acc", float("nan")),
        "loss": final.get("train_loss", float("nan")),
        "contrastive_acc": final.get("train_contrastive_acc", float("nan")),
        "pairs_per_second": outcome.samples_per_second,
        "train_seconds": outcome.train_seconds,
        "warmup_seconds": outcome.warmup_seconds,
        **schedule.metrics(),
        "resumed_at_step": outcome.resumed_at_step,
        "tracking_seconds": outcome.tracking_seconds,
    }
    return finish_training(
        rt, ckpt, task.model.encoder, files=files, extra={"stage": "pretrain"},
        history=outcome.history,
        curves={"loss": ["train_loss"], "accuracy": ["knn_acc", "train_contrastive_acc"],
                "learning rate": ["lr"]},
        title="SimCLR pretraining", metrics=metrics, warnings=schedule.warnings)


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery pretrain``."""
    declared = stage_named("pretrain")
    with stage.tracked(declared, params) as run:
        stage.check_plan(params)
        weights = None
        if params.model.teacher.weights is not None:  # through the download stage's fetcher
            from refinery.stages.download.fetch import fetch

            w = params.model.teacher.weights
            fetched = fetch(w.url, paths.DOWNLOAD_CACHE / "weights", w.checksum,
                            params.download.http)
            run.set_tags({"refinery.teacher_weights": fetched.url,
                          "refinery.teacher_weights_sha256": fetched.sha256})
            weights = fetched.path
        result = pretrain(params.pretrain, model_p=params.model, engine_p=params.engine,
                          seed=params.seed, sink=run, weights=weights,
                          files=TrainingFiles.for_stage(declared.name, paths.PRETRAINED))
        stage.finish(declared, run, result.metrics(), warnings=result.warnings,
                     artifacts=[declared.reports / "curves.png",
                                paths.PRETRAINED / "config.json"])
