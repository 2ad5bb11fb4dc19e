"""The training loop every training stage runs.

A stage supplies a :class:`Task` (its model, how a batch becomes a loss, how
to evaluate); the :class:`Trainer` owns everything else: batching over a
seeded per-epoch permutation, gradient accumulation, DDP, AMP, the schedule,
checkpoints and resume, progress and metric logging.

Batching is defined on the *global* batch: every rank draws the same
permutation and the same augmentation parameters for the whole batch, then
computes its own slice. That is what makes one process and N processes with
the same global batch give the same result.

What the device waits for: nothing, per step. The epoch's permutation goes to
the device once per epoch (from pinned memory, asynchronously), a step's
indices are slices of it, the logged loss is copied back asynchronously and
read one logging interval later, and checkpoints come by elapsed time (plus
one at the end), not every epoch. Compilation and cuDNN autotuning happen in
untimed warm-up steps whose effects are undone before training starts.
"""

from __future__ import annotations

import copy
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
    checkpoint_every: int = 0  # steps; 0: off
    checkpoint_minutes: float = 0.0  # elapsed time between mid-training checkpoints; 0: off
    # Untimed warm-up steps (compile, cuDNN autotune) before training, their effects undone;
    # None: WARMUP_STEPS on CUDA or when compiling, else 0 (eager CPU has nothing to warm up).
    untimed_steps: int | None = None
    group_lr_scales: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainOutcome:
    history: list[dict[str, float]]
    final: dict[str, float]
    train_seconds: float  # optimizer steps only: warm-up, evaluation and checkpoints excluded
    total_seconds: float
    samples_per_second: float
    resumed_at_step: int
    steps: int
    tracking_seconds: float
    warmup_seconds: float = 0.0  # the untimed warm-up steps (compilation, autotuning)


#: Warm-up steps on CUDA or with compile: the first compiles the forward and backward
#: graphs and autotunes cuDNN, the second catches a recompile (e.g. optimizer state now
#: present) so that none lands in the timed epochs.
WARMUP_STEPS = 2


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
        self.untimed_steps = (spec.untimed_steps if spec.untimed_steps is not None else
                              WARMUP_STEPS if rt.compile or rt.device.type == "cuda" else 0)
        # where the batch indices must live: the device when the data is resident there
        self.index_device = torch.device(getattr(task, "index_device", rt.device))
        self._pending_loss: _LaggedScalar | None = None
        self._saved_at = time.monotonic()  # rank 0's clock for checkpoints by time

    # ------------------------------------------------------------------ helpers
    def _permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order, on the device that indexes the data.

        Drawn on the CPU (the same order on every device, so a CPU and a GPU run see the
        same batches), then copied once per epoch from pinned memory without blocking;
        a step's indices are slices of it, with no copy and no host sync per step.
        """
        g = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.task.num_samples(), generator=g)
        if self.index_device.type == "cuda":
            return perm.pin_memory().to(self.index_device, non_blocking=True)
        return perm.to(self.index_device)

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.rt.is_main:
            return
        start = time.perf_counter()
        self.sink.log_metrics(metrics, step=step)
        self.tracking_seconds += time.perf_counter() - start

    # -------------------------------------------------------------- checkpoints
    def _checkpoint(self, progress_: Progress, wait: bool = True) -> None:
        """Save where the loop is (rank 0 writes; with ``wait`` every rank waits for it)."""
        if self.rt.is_main:
            self.ckpt.save(progress_.state(self))
        self._saved_at = time.monotonic()
        if wait:
            self.rt.barrier()

    def _checkpoint_due(self, at: Progress) -> tuple[bool, bool]:
        """(due by steps: every rank agrees; due by time: rank 0 alone decides).

        By steps depends on the step alone, never on when rank 0 last saved by time, so
        every rank reaches the same barriers.
        """
        spec = self.spec
        by_steps = bool(spec.checkpoint_every) and at.global_step % spec.checkpoint_every == 0
        by_time = (spec.checkpoint_minutes > 0 and self.rt.is_main
                   and time.monotonic() - self._saved_at >= 60 * spec.checkpoint_minutes)
        return by_steps, by_time

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
        warmup_seconds = self.warm_up()
        progress_ = self._resume()
        resumed_at = progress_.global_step
        self._saved_at = time.monotonic()
        for epoch in range(progress_.epoch, self.plan.epochs):
            if epoch != progress_.epoch or progress_.step == 0:
                progress_.start_epoch(epoch)
            self._train_epoch(progress_)
            self._end_epoch(progress_)
        if progress_.global_step != resumed_at:
            self._checkpoint(progress_)  # the end (outputs are written from it on)
        outcome = self._outcome(progress_, resumed_at, started)
        outcome.warmup_seconds = warmup_seconds
        return outcome

    def warm_up(self) -> float:
        """Run ``untimed_steps`` real steps (compile, autotune), then undo them; seconds taken.

        The model's weights and buffers, the optimizer's state and every random generator
        the step draws from are restored, so the run that follows is the one it would
        have been without warm-up (on CUDA up to cuDNN's autotuned kernel choice, which
        ``deterministic: false`` leaves free anyway).
        """
        if self.untimed_steps <= 0:
            return 0.0
        start = time.perf_counter()
        weights = {k: v.detach().clone() for k, v in self.raw.state_dict().items()}
        optimizer = copy.deepcopy(self.optimizer.state_dict())
        generator, cpu_rng = self.generator.get_state(), torch.get_rng_state()
        cuda_rng = (torch.cuda.get_rng_state(self.rt.device)
                    if self.rt.device.type == "cuda" else None)
        self.raw.train()
        indices = torch.arange(self.plan.batch, device=self.index_device)
        set_lr(self.optimizer, lr_factor(self.plan.optim.schedule, 0, self.total_steps,
                                         self.warmup_steps))
        for _ in range(self.untimed_steps):
            self._optimizer_step(indices, {})
        elapsed = self._elapsed(start)
        self.raw.load_state_dict(weights)
        self.optimizer.load_state_dict(optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.generator.set_state(generator)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.rt.device)
        if self.rt.is_main:
            log.info("%s: %d warm-up step(s) (compile, autotune) took %.1f s, not timed",
                     self.spec.stage, self.untimed_steps, elapsed)
        return elapsed

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
            loss = self._step(at, perm, step)
            bar.update(1)  # host-side only
            if at.global_step % spec.log_every == 0:
                shown = self._log_step(loss, at)
                if shown is not None:
                    bar.set_postfix(loss=f"{shown:.4f}", lr=f"{at.lr:.3g}")
            if step + 1 < self.steps_per_epoch:  # the epoch's end has its own check
                by_steps, by_time = self._checkpoint_due(at)
                if by_steps or by_time:
                    at.add_time(self._elapsed(tick))
                    # by time only rank 0 knows it is due: no barrier (DDP ranks hold the
                    # same state; rank 0's is the run's)
                    self._checkpoint(at, wait=by_steps)
                    tick = time.perf_counter()
        at.add_time(self._elapsed(tick))
        self._flush_loss()
        bar.close()

    def _step(self, at: Progress, perm: torch.Tensor, step: int) -> torch.Tensor:
        """Step ``step`` of the epoch whose order is ``perm``: what the device sees per step.

        Nothing here reads a device value on the host (tests/test_engine_ops.py checks).
        """
        plan = self.plan
        factor = lr_factor(plan.optim.schedule, at.global_step, self.total_steps,
                           self.warmup_steps)
        at.lr = set_lr(self.optimizer, factor)
        loss = self._optimizer_step(perm[step * plan.batch:(step + 1) * plan.batch], at.sums)
        at.global_step += 1
        at.seen += plan.batch
        at.step = step + 1
        return loss

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

    def _log_step(self, loss: torch.Tensor, at: Progress) -> float | None:
        """Start copying this step's loss to the host; log the previous logged one.

        Reading a loss back waits for the device to finish that step; read one logging
        interval late, it is long done (on CUDA), so the host never stalls. A divergence
        is therefore raised up to ``log_every`` steps late. Returns the loss logged now.
        """
        previous = self._flush_loss()
        self._pending_loss = _LaggedScalar(loss, at.global_step, at.lr)
        return previous

    def _flush_loss(self) -> float | None:
        """Log the pending loss, if any (waits for it); raise if it is not finite."""
        pending, self._pending_loss = self._pending_loss, None
        if pending is None:
            return None
        loss_now = pending.value()
        if not math.isfinite(loss_now):
            raise TrainingDiverged(f"loss is {loss_now} at step {pending.step}; lower "
                                   f"{self.plan.stage}.optim.lr (now {self.plan.optim.lr:.4g})")
        self._log({"step/loss": loss_now, "step/lr": pending.lr}, pending.step)
        return loss_now

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
        if at.epoch < self.plan.epochs:  # the last epoch's is fit()'s final checkpoint
            by_steps, by_time = self._checkpoint_due(at)
            if by_steps or by_time:
                self._checkpoint(at, wait=by_steps)

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


class _LaggedScalar:
    """A 0-d device tensor on its way to the host: copied without blocking, read later."""

    def __init__(self, tensor: torch.Tensor, step: int, lr: float) -> None:
        self.step, self.lr = step, lr
        self.event: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            self.host = torch.empty((), dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor.detach(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.detach()

    def value(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
