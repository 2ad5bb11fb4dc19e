"""Everything the params will do on the prepared data, checked before any training starts.

Once ``prepare`` has run, the sample count of every training stage is known,
and with it each stage's batch, length and learning rate (the one rule in
:mod:`refinery.engine.schedule`), and whether the augmentation policies fit
the images. So this is checked at the end of ``prepare`` (before it writes),
by ``refinery check-params`` when prepared data exists, and again at the
start of every training stage, for the *whole* plan: a stage never trains for
minutes while a later one is bound to fail on something known now.

Infeasible settings raise one :class:`~refinery.errors.ParamsError` listing
every problem with its key; adapted schedules and too-short ones are returned
as notes and warnings for the log and the stage's MLflow run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery.engine.schedule import Schedule, for_section
from refinery.errors import ParamsError
from refinery.params import Params

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Plan:
    schedules: dict[str, Schedule]  # by params section
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [schedule.describe() for schedule in self.schedules.values()]
        lines += [f"note: {note}" for s in self.schedules.values() for note in s.notes]
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)

    def report(self, logger: logging.Logger = log) -> None:
        for schedule in self.schedules.values():
            schedule.report(logger)


def training_samples(params: Params, meta: Mapping[str, Any]) -> dict[str, int]:
    """The index space each training section's epoch covers (the stages declare it)."""
    from refinery.pipeline import STAGES

    return {stage.schedule: stage.epoch_of(params, meta) for stage in STAGES
            if stage.schedule and stage.epoch_of is not None}


def static_problems(params: Params) -> list[str]:
    """What is wrong whatever the data (``check-params`` reports these before ``prepare``)."""
    from refinery import models

    problems = []
    arch = params.model.teacher.arch
    if arch != "auto" and arch not in models.available():
        problems.append(f"model.teacher.arch: unknown model {arch!r}; expected one of "
                        f"{models.available()}")
    return problems


def check_plan(params: Params, meta: Mapping[str, Any], world_size: int = 1) -> Plan:
    """The whole plan for ``params`` on data described by ``meta``; raise if any part fails."""
    from refinery.stages.augment import resolve as resolve_policies

    problems: list[str] = []
    schedules: dict[str, Schedule] = {}
    for section, samples in training_samples(params, meta).items():
        try:
            schedules[section] = for_section(section, samples, getattr(params, section),
                                             world_size)
        except ParamsError as exc:
            problems.append(str(exc))
    try:
        resolve_policies(params.augment, dict(meta))
    except ParamsError as exc:
        problems.append(str(exc).replace("augment params cannot work on the prepared images:\n"
                                         "  ", ""))
    problems.extend(static_problems(params))
    if params.finetune.mode == "linear":
        problems.append("finetune.mode: linear probes the pretrained backbone, but the "
                        "finetune_scratch baseline trains the same params from random weights, "
                        "where a linear probe measures nothing; use full")
    if problems:
        raise ParamsError("these params cannot work on the prepared data "
                          f"({meta['counts']['train']} train images, {meta['labeled']} "
                          "labeled):\n  " + "\n  ".join(problems))
    warnings = [w for schedule in schedules.values() for w in schedule.warnings]
    return Plan(schedules, warnings)


def check_prepared(params: Params, prepared_dir: Path, world_size: int = 1) -> Plan | None:
    """:func:`check_plan` against ``prepared_dir/meta.json``; None if nothing is prepared."""
    meta_path = Path(prepared_dir) / "meta.json"
    if not meta_path.exists():
        return None
    return check_plan(params, json.loads(meta_path.read_text(encoding="utf-8")), world_size)
