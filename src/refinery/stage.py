"""What a stage is: one declaration of what it reads and writes, and its thin adapter.

Stage ``X`` is the module ``refinery.stages.X`` (a file, or a package when it
needs helpers of its own). It holds three things, as DVC's
example-get-started keeps a stage in one script:

- the plain function ``X(...)``: typed params and paths in, a result out; no
  MLflow, no argument parsing;
- ``main(params, args)``, the adapter the CLI runs: it opens the stage's
  MLflow run (:func:`tracked`), calls ``X`` with the paths of its
  declaration, and hands the numbers to :func:`finish`;
- ``STAGE``, the declaration: params keys, the data it reads (``deps``) and
  writes (``outs``), its headline metrics and plots. ``dvc.yaml`` is
  generated from the declarations (:mod:`refinery.pipeline`), code
  dependencies included (read from the imports, :mod:`refinery.codedeps`).

Every stage also writes ``reports/X/details.json`` (every number),
``metrics/X.json`` (the headline) and ``lineage/X.json`` (the MLflow run that
made the outputs); the declaration adds those paths itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery import fsutil, paths
from refinery.params import Params, flatten


@dataclass(frozen=True)
class PlotFile:
    """A ``cache: false`` plot a stage writes, with DVC's options for it."""

    path: Path
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str  # the DVC stage name
    help: str
    params: tuple[str, ...]  # params keys the stage reads (dvc.yaml lists exactly these)
    deps: tuple[Path, ...]  # data it reads: other stages' outputs
    outs: tuple[Path, ...]  # data it writes, cached by DVC (reports/lineage are added)
    #: the few numbers a person compares between experiments: ``metrics/<name>.json``
    headline: tuple[str, ...]
    plots: tuple[PlotFile, ...] = ()
    module: str = ""  # its code: refinery.stages.<module>; default: the name
    command: str = ""  # the CLI sub-command (several stages may share one); default: module
    cli_args: tuple[str, ...] = ()  # fixed CLI arguments of this stage
    arguments: tuple[tuple[str, dict[str, Any]], ...] = ()  # the sub-command's options
    #: a training stage: the params section whose schedule it runs (engine.schedule), and
    #: how many samples one epoch covers, from the params and prepare's meta.json
    schedule: str = ""
    epoch_of: Callable[[Params, Mapping[str, Any]], int] | None = None
    #: the prepared data sets its MLflow run names as inputs: (split, context), e.g.
    #: ("labeled", "training"); splits of refinery.formats.prepared.DATASET_SPLITS
    datasets: tuple[tuple[str, str], ...] = ()

    @property
    def import_path(self) -> str:
        return f"refinery.stages.{self.module or self.name}"

    @property
    def cli(self) -> str:
        return self.command or self.module or self.name

    @property
    def reports(self) -> Path:
        return paths.reports_dir(self.name)

    @property
    def metrics_file(self) -> Path:
        return paths.metrics_file(self.name)

    @property
    def lineage_file(self) -> Path:
        return paths.LINEAGE / f"{self.name}.json"

    @property
    def cached_outs(self) -> tuple[Path, ...]:
        return (*self.outs, self.reports, self.lineage_file)


# --------------------------------------------------------------------- the adapter


def params_subset(params: Params, keys: Sequence[str]) -> dict[str, Any]:
    """The part of the params a stage reads, as nested dicts (for logging)."""
    full = params.to_dict()
    subset: dict[str, Any] = {}
    for key in keys:
        node: Any = full
        for part in key.split("."):
            node = node[part]
        subset[key] = node
    return subset


@contextlib.contextmanager
def tracked(stage: Stage, params: Params) -> Iterator[Any]:
    """The stage's MLflow run; under torchrun only rank 0 tracks, the others get a no-op.
    A stage that reads prepared data names its data sets on the run before it works."""
    from refinery import tracking
    from refinery.pipeline import dataset_roles, recorded_with
    from refinery.ranks import is_main_process

    if not is_main_process():
        yield tracking.NullRun()
        return
    recorded = recorded_with(stage.name)
    with tracking.stage_run(stage.name, params_subset(params, stage.params),
                            experiment=params.tracking.experiment,
                            full_params=params.to_dict(), recorded=recorded,
                            roles=dataset_roles(recorded),
                            system_metrics=bool(stage.schedule)) as run:
        if paths.PREPARED not in stage.outs:
            _log_datasets(stage, run)
        yield run


def _log_datasets(stage: Stage, run: Any) -> None:
    if not stage.datasets or not (paths.PREPARED / "meta.json").is_file():
        return
    from refinery.formats.prepared import datasets

    run.log_datasets(datasets(paths.PREPARED), stage.datasets)


def finish(stage: Stage, run: Any, metrics: Mapping[str, Any], *,
           artifacts: Sequence[Path] = (), warnings: Sequence[str] = ()) -> None:
    """Every number to MLflow and ``details.json``, the headline to DVC (rank 0 only).

    ``metrics`` may be nested one level (per model, for ``evaluate``): the
    headline keys are then taken from each group.
    """
    from refinery.ranks import is_main_process

    if not is_main_process():
        return
    if warnings:
        run.set_tags({"refinery.warnings": "; ".join(warnings)[:5000]})
    for artifact in artifacts:
        run.log_artifact(artifact)
    fsutil.write_json(paths.details_file(stage.name), dict(metrics))
    fsutil.write_json(stage.metrics_file, _headline(metrics, stage.headline))
    run.log_metrics(flatten(metrics))
    if paths.PREPARED in stage.outs:  # the stage that made the data sets names them now
        _log_datasets(stage, run)
    _log_models(stage, run)


def _log_models(stage: Stage, run: Any) -> None:
    """The model folders the stage wrote, as MLflow logged models of its run."""
    from refinery.pipeline import MODELS

    made = [row for row in MODELS if row.path in stage.outs]
    if not made:
        return
    from refinery import logged_models
    from refinery.formats.prepared import load_split

    example = logged_models.example_images(load_split(paths.PREPARED / "val.pt").images)
    for row in made:
        logged_models.log_model(run, row, example)


def _headline(metrics: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    if any(isinstance(value, Mapping) for value in metrics.values()):
        return {group: _headline(values, keys) for group, values in metrics.items()}
    return {key: metrics[key] for key in keys if key in metrics}


def check_plan(params: Params, run: Any = None, meta: Any = None) -> None:
    """The whole training plan against the prepared data (:mod:`refinery.plan`): raise
    before any work if it cannot run. With ``run`` (prepare), also log every stage's
    resolved schedule and tag the run with the warnings."""
    from refinery.plan import check_plan as check
    from refinery.plan import check_prepared
    from refinery.ranks import env_world_size, is_main_process

    plan = (check(params, meta, env_world_size()) if meta is not None
            else check_prepared(params, paths.PREPARED, env_world_size()))
    if plan is None or run is None or not is_main_process():
        return
    plan.report()
    if plan.warnings:
        run.set_tags({"refinery.warnings": "; ".join(plan.warnings)[:5000]})
