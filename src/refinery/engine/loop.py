"""The training loop every training stage runs.

A stage supplies a :class:`Task` (its model, how a batch becomes a loss, how
to evaluate); the :class:`Trainer` owns everything else: batching over a
seeded per-epoch permutation, gradient accumulation, DDP, AMP, the schedule,
checkpoints and resume, progress and metric logging.

Batching is defined on the *global* batch: every rank draws the same
permutation and the same augmentation parameters for the whole batch, then
computes its own slice. That is what makes one process and N processes with
the same global batch give the same result.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from refinery import progress
from refinery.engine.checkpoint import Checkpointer
from refinery.engine.optim import build_optimizer, lr_factor, param_groups, set_lr
from refinery.engine.runtime import Runtime, convert_sync_batchnorm
from refinery.engine.schedule import Schedule
from refinery.errors import TrainingDiverged

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...


class NullSink:
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        return None


@dataclass(frozen=True)
class Batch:
    """One micro-batch: the indices of the whole (global) micro-batch and this rank's slice."""

    indices: torch.Tensor  # global micro-batch indices, same on every rank
    local: slice  # this rank's part of ``indices``

    @property
    def local_indices(self) -> torch.Tensor:
        return self.indices[self.local]


class Task(Protocol):
    """What a training stage plugs into the engine."""

    model: nn.Module  # trained parameters live here (unwrapped)

    def num_samples(self) -> int:
        """Size of the index space the per-epoch permutation covers."""
        ...

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over this rank's slice, plus detached per-batch metrics to average."""
        ...

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Metrics at the end of ``epoch`` (0-based); ``model`` is the plain module."""
        ...


@dataclass(frozen=True)
class TrainSpec:
    stage: str
    schedule: Schedule  # batch, length and learning rate, resolved against the data
    seed: int
    eval_every: int = 1
    log_every: int = 10
    checkpoint_every: int = 0
    group_lr_scales: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainOutcome:
    history: list[dict[str, float]]
    final: dict[str, float]
    train_seconds: float
    total_seconds: float
    samples_per_second: float
    resumed_at_step: int
    steps: int
    tracking_seconds: float


class Trainer:
    def __init__(self, rt: Runtime, task: Task, spec: TrainSpec, checkpointer: Checkpointer,
                 sink: MetricSink | None = None) -> None:
        self.rt, self.task, self.spec, self.ckpt = rt, task, spec, checkpointer
        self.sink = sink or NullSink()
        self.tracking_seconds = 0.0
        plan = spec.schedule
        if (plan.samples, plan.world_size) != (task.num_samples(), rt.world_size):
            raise ValueError(f"{spec.stage}: schedule resolved for {plan.samples} samples on "
                             f"{plan.world_size} process(es), not {task.num_samples()} on "
                             f"{rt.world_size}")
        self.plan = plan
        self.micro = plan.micro_batch
        self.local = plan.local_batch
        self.steps_per_epoch = plan.steps_per_epoch
        self.total_steps = plan.total_steps

        model = task.model.to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if rt.distributed:
            model = convert_sync_batchnorm(model, rt.device)
            task.model = model
        self.raw = model
        self.optimizer = build_optimizer(
            param_groups(model, prefix_scales=spec.group_lr_scales), plan.optim
        )
        wrapped: nn.Module = model
        if rt.distributed:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        if rt.compile:
            wrapped = torch.compile(wrapped)
        self.model = wrapped
        self.generator = torch.Generator(device=rt.device)
        self.generator.manual_seed(spec.seed + 1)
        self.warmup_steps = round(plan.optim.warmup_epochs * self.steps_per_epoch)

    # ------------------------------------------------------------------ helpers
    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + epoch)
        return torch.randperm(self.task.num_samples(), generator=g)

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.rt.is_main:
            return
        start = time.perf_counter()
        self.sink.log_metrics(metrics, step=step)
        self.tracking_seconds += time.perf_counter() - start

    # -------------------------------------------------------------- checkpoints
    def _checkpoint(self, progress_: Progress) -> None:
        """Save where the loop is (rank 0 writes; every rank waits for it)."""
        if self.rt.is_main:
            self.ckpt.save(progress_.state(self))
        self.rt.barrier()

    def _resume(self) -> Progress:
        """The loop's position: from this run's last checkpoint, or the start."""
        state = self.ckpt.load()
        if state is None:
            return Progress()
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.rt.device)
        log.info("%s: resuming from checkpoint at epoch %d, step %d", self.spec.stage,
                 state["epoch"], state["step_in_epoch"])
        return Progress(epoch=state["epoch"], step=state["step_in_epoch"],
                        global_step=state["global_step"], history=list(state["history"]),
                        train_seconds=state["train_seconds"],
                        sums={k: v.to(self.rt.device) for k, v in state["sums"].items()})

    def _reduce_mean(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        if not sums:
            return {}
        keys = sorted(sums)
        packed = torch.stack([sums[k].float() for k in keys]) / max(count, 1)
        if self.rt.distributed:
            dist.all_reduce(packed)
            packed /= self.rt.world_size
        return {k: float(v) for k, v in zip(keys, packed.tolist(), strict=True)}

    # --------------------------------------------------------------------- loop
    def fit(self) -> TrainOutcome:
        """Train every remaining epoch (resuming a checkpoint of this run), then report."""
        started = time.perf_counter()
        progress_ = self._resume()
        resumed_at = progress_.global_step
        for epoch in range(progress_.epoch, self.plan.epochs):
            if epoch != progress_.epoch or progress_.step == 0:
                progress_.start_epoch(epoch)
            self._train_epoch(progress_)
            self._end_epoch(progress_)
        return self._outcome(progress_, resumed_at, started)

    def _train_epoch(self, at: Progress) -> None:
        """The optimizer steps of one epoch, from ``at.step``, with mid-epoch checkpoints."""
        spec, rt, plan = self.spec, self.rt, self.plan
        perm = self._permutation(at.epoch)
        self.raw.train()
        bar = progress.bar(total=self.steps_per_epoch, initial=at.step, unit="step",
                           desc=f"{spec.stage} {at.epoch + 1}/{plan.epochs}",
                           disable=not rt.is_main or progress.disabled())
        tick = time.perf_counter()
        for step in range(at.step, self.steps_per_epoch):
            factor = lr_factor(plan.optim.schedule, at.global_step, self.total_steps,
                               self.warmup_steps)
            at.lr = set_lr(self.optimizer, factor)
            loss = self._optimizer_step(perm[step * plan.batch:(step + 1) * plan.batch], at.sums)
            at.global_step += 1
            at.seen += plan.batch
            at.step = step + 1
            bar.update(1)
            if at.global_step % spec.log_every == 0:
                self._log_step(loss, at)
                bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{at.lr:.3g}")
            if spec.checkpoint_every and at.global_step % spec.checkpoint_every == 0 \
                    and step + 1 < self.steps_per_epoch:
                at.add_time(self._elapsed(tick))
                self._checkpoint(at)
                tick = time.perf_counter()
        at.add_time(self._elapsed(tick))
        bar.close()

    def _optimizer_step(self, batch_idx: torch.Tensor, sums: dict[str, torch.Tensor]
                        ) -> torch.Tensor:
        """One optimizer step over the global batch, in ``accumulate`` micro-batches."""
        rt, plan = self.rt, self.plan
        rank_slice = slice(rt.rank * self.local, (rt.rank + 1) * self.local)
        for micro in range(plan.accumulate):
            idx = batch_idx[micro * self.micro:(micro + 1) * self.micro]
            sync = micro == plan.accumulate - 1
            ctx = (self.model.no_sync() if rt.distributed and not sync
                   and hasattr(self.model, "no_sync") else _null())
            with ctx:
                with rt.autocast():
                    loss, metrics = self.task.loss(self.model, Batch(idx, rank_slice),
                                                   self.generator)
                (loss / plan.accumulate).backward()
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0) + value.detach().float() / plan.accumulate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _log_step(self, loss: torch.Tensor, at: Progress) -> None:
        loss_now = float(loss)
        if not math.isfinite(loss_now):
            raise TrainingDiverged(f"loss is {loss_now} at step {at.global_step}; lower "
                                   f"{self.plan.stage}.optim.lr (now {self.plan.optim.lr:.4g})")
        self._log({"step/loss": loss_now, "step/lr": at.lr}, at.global_step)

    def _end_epoch(self, at: Progress) -> None:
        """The epoch's record (train means, evaluation when due), logged; then a checkpoint."""
        spec, rt = self.spec, self.rt
        record = {"epoch": at.epoch + 1, "lr": at.lr, "train_seconds": at.train_seconds}
        record.update({f"train_{k}": v for k, v in
                       self._reduce_mean(at.sums, self.steps_per_epoch).items()})
        if at.seen:
            record["samples_per_second"] = at.seen / max(at.epoch_seconds, 1e-9)
        last = at.epoch + 1 == self.plan.epochs
        if last or (at.epoch + 1) % spec.eval_every == 0:
            record.update(self._evaluate(at.epoch))
        at.history.append(record)
        self._log({k: v for k, v in record.items() if k != "epoch"}, at.epoch + 1)
        if rt.is_main:
            log.info("%s epoch %d: %s", spec.stage, at.epoch + 1,
                     ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        at.epoch, at.step, at.sums = at.epoch + 1, 0, {}
        self._checkpoint(at)

    def _evaluate(self, epoch: int) -> dict[str, float]:
        self.raw.eval()
        with torch.no_grad():  # the tasks' forwards autocast themselves; their metrics are fp32
            metrics = self.task.evaluate(self.raw, epoch)
        self.raw.train()
        return metrics

    def _outcome(self, at: Progress, resumed_at: int, started: float) -> TrainOutcome:
        steps_run = at.global_step - resumed_at
        return TrainOutcome(
            history=at.history,
            final=at.history[-1] if at.history else {},
            train_seconds=at.train_seconds,
            total_seconds=time.perf_counter() - started,
            samples_per_second=(steps_run * self.plan.batch / at.train_seconds
                                if at.train_seconds > 0 else 0.0),
            resumed_at_step=resumed_at,
            steps=at.global_step,
            tracking_seconds=self.tracking_seconds,
        )

    def _elapsed(self, tick: float) -> float:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        return time.perf_counter() - tick


@dataclass
class Progress:
    """Where the loop is; what a checkpoint stores besides the model and optimizer."""

    epoch: int = 0
    step: int = 0  # next step within ``epoch``
    global_step: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # this epoch's metric sums
    lr: float = 0.0
    seen: int = 0  # samples this epoch, in this process's run (for throughput)
    epoch_seconds: float = 0.0

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step, self.sums, self.seen, self.epoch_seconds = epoch, 0, {}, 0, 0.0

    def add_time(self, seconds: float) -> None:
        self.train_seconds += seconds
        self.epoch_seconds += seconds

    def state(self, trainer: Trainer) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": {k: v.detach().cpu() for k, v in trainer.raw.state_dict().items()},
            "optimizer": trainer.optimizer.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step,
            "global_step": self.global_step,
            "generator": trainer.generator.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
            "history": self.history,
            "train_seconds": self.train_seconds,
        }
        if trainer.rt.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(trainer.rt.device)
        return state


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
