"""How long a training stage trains, and with which batch and learning rate: one rule.

The params give a *requested* global batch, learning rate and length; the
data decide what is sensible. The same rule resolves every training stage on
every data set (200 photos or 50,000), so no profile carries per-data-set
numbers a rule can compute:

1. **Batch capped by the data.** At most ``samples // MIN_STEPS_PER_EPOCH``
   (at least four optimizer steps per epoch), rounded down to a multiple of
   ``accumulate x processes``, never below two images per process (batch
   norm needs two). 219 photos with ``batch_size: 128`` train with 54.
2. **Learning rate follows the batch.** When the batch is capped, the
   learning rate is rescaled with it: linearly for SGD and LARS (Goyal et
   al. 2017), by the square root for AdamW (Malladi et al. 2022).
3. **A floor in steps.** ``epochs`` is raised until the stage runs at least
   ``min_steps`` optimizer steps; an epoch is the natural unit for the
   monitors, a step count is what learning needs.
4. **Saying so.** Every adaptation is a note; a stage left with fewer than
   :data:`FEW_STEPS` steps gets a warning. Stages log both and record the
   resolved batch, learning rate, epochs and steps as metrics.

What no rule can fix (fewer samples than two per process) is a
:class:`~refinery.errors.ParamsError` naming the key and a value that works.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from refinery.errors import ParamsError
from refinery.params import OptimParams

MIN_STEPS_PER_EPOCH = 4
MIN_PER_PROCESS = 2
#: Fewer optimizer steps than this is a warning in the log and on the stage's MLflow run.
FEW_STEPS = 100


@dataclass(frozen=True)
class Schedule:
    """A training stage's resolved length, batch and learning rate."""

    stage: str  # the params section, named in messages ("finetune" for finetune_scratch too)
    samples: int  # the index space one epoch covers
    requested_batch: int
    batch: int  # global batch actually used
    accumulate: int
    world_size: int
    steps_per_epoch: int
    epochs: int
    optim: OptimParams  # with the resolved learning rate
    notes: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def micro_batch(self) -> int:
        """Images per forward pass over all processes (the global batch / accumulate)."""
        return self.batch // self.accumulate

    @property
    def local_batch(self) -> int:
        """Images per forward pass on one process."""
        return self.micro_batch // self.world_size

    def metrics(self) -> dict[str, float]:
        return {"batch_size": float(self.batch), "lr": self.optim.lr,
                "epochs": float(self.epochs), "steps": float(self.total_steps),
                "steps_per_epoch": float(self.steps_per_epoch)}

    def report(self, logger: logging.Logger) -> None:
        """Log what the rule decided: adaptations as info, too few steps as a warning."""
        logger.info("%s", self.describe())
        for note in self.notes:
            logger.info("%s (the schedule rule adapted it)", note)
        for warning in self.warnings:
            logger.warning("%s", warning)

    def describe(self) -> str:
        return (f"{self.stage}: {self.samples} samples, batch {self.batch}, lr {self.optim.lr:.4g}"
                f", {self.epochs} epochs x {self.steps_per_epoch} steps = {self.total_steps} steps")


def lr_for_batch(optim: OptimParams, batch: int, requested: int) -> float:
    """The learning rate for ``batch`` when ``optim.lr`` was set for ``requested``."""
    ratio = batch / requested
    return optim.lr * (math.sqrt(ratio) if optim.optimizer == "adamw" else ratio)


def resolve(stage: str, samples: int, *, batch_size: int, epochs: int, optim: OptimParams,
            accumulate: int = 1, min_steps: int = 0, world_size: int = 1,
            batch_key: str = "batch_size") -> Schedule:
    """Apply the rule (module doc) to a stage's params and its sample count."""
    unit = accumulate * world_size
    if batch_size % unit:
        raise ParamsError(f"{stage}.{batch_key} ({batch_size}) must be a multiple of "
                          f"{stage}.accumulate x processes ({accumulate} x {world_size}); "
                          f"e.g. {max(unit, batch_size // unit * unit)}")
    smallest = MIN_PER_PROCESS * unit
    if samples < smallest:
        raise ParamsError(
            f"{stage}: {samples} training samples cannot fill {MIN_PER_PROCESS} images per "
            f"process x {stage}.accumulate {accumulate} x {world_size} process(es); lower "
            f"{stage}.accumulate to 1 or add data" + _sample_hint(stage))
    notes: list[str] = []
    cap = max(smallest, samples // MIN_STEPS_PER_EPOCH // unit * unit)
    batch = batch_size
    if batch > cap:
        batch = cap
        notes.append(f"{stage}.{batch_key} {batch_size} > {samples} samples / "
                     f"{MIN_STEPS_PER_EPOCH} steps per epoch: batch {batch}")
    lr = optim.lr
    if batch != batch_size:
        lr = lr_for_batch(optim, batch, batch_size)
        rule = "sqrt" if optim.optimizer == "adamw" else "linear"
        notes.append(f"{stage}.optim.lr {optim.lr:g} rescaled ({rule}) for batch {batch}: "
                     f"{lr:.4g}")
    steps_per_epoch = samples // batch
    resolved_epochs = epochs
    if min_steps and steps_per_epoch * epochs < min_steps:
        resolved_epochs = math.ceil(min_steps / steps_per_epoch)
        notes.append(f"{stage}.epochs {epochs} gives {steps_per_epoch * epochs} steps < "
                     f"{stage}.min_steps {min_steps}: {resolved_epochs} epochs")
    total = steps_per_epoch * resolved_epochs
    warnings = []
    if total < FEW_STEPS:
        warnings.append(f"{stage} runs only {total} optimizer steps ({resolved_epochs} epochs x "
                        f"{steps_per_epoch}); set {stage}.min_steps: {FEW_STEPS} (or "
                        f"{stage}.epochs: {math.ceil(FEW_STEPS / steps_per_epoch)})")
    return Schedule(stage=stage, samples=samples, requested_batch=batch_size, batch=batch,
                    accumulate=accumulate, world_size=world_size,
                    steps_per_epoch=steps_per_epoch, epochs=resolved_epochs,
                    optim=optim.model_copy(update={"lr": lr}), notes=tuple(notes),
                    warnings=tuple(warnings))


def for_section(section: str, samples: int, p: Any, world_size: int = 1) -> Schedule:
    """:func:`resolve` for a params section with ``batch_size``, ``epochs``, ``optim``,
    ``accumulate`` and ``min_steps`` (pretrain, finetune, distill)."""
    return resolve(section, samples, batch_size=p.batch_size, epochs=p.epochs, optim=p.optim,
                   accumulate=p.accumulate, min_steps=p.min_steps, world_size=world_size)


def _sample_hint(stage: str) -> str:
    if stage in ("finetune", "finetune_scratch"):
        return " (fine-tuning sees the labeled subset only: raise prepare.label_fraction)"
    return ""
