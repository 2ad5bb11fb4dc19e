"""The Prefect flow for repeated seeds: one task per seed, ``jobs`` at a time, then a summary.

Each seed task runs ``dvc exp run --temp -S seed=<s>`` (so every seed is a
normal DVC experiment in ``dvc exp show``), with ``cpus / jobs`` threads.
The data stages run once first (:func:`refinery.seeds.warm_data`; the first
seed alone when overrides change data params), and every seed, whose data
params are the same (``data_seed`` is fixed), restores them from the
run-cache instead of running them. The summary task is ``refinery seeds``' own
(:func:`refinery.seeds.publish`): ``reports/seeds/``, one MLflow parent run
over the seeds' pipeline runs, and here also a Prefect markdown artifact.

No logic of its own: the seeds' runner and statistics are
:mod:`refinery.seeds`. Run it once with ``python -m pipelines.seeds --seeds 0
1 2 3 4 --jobs 2``; ``README.md`` ("Seeds on several machines") shows the
work-pool set-up.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from refinery import seeds as seeds_lib
from refinery.profiles import parse_assignments

FLOW_NAME = "refinery-seeds"
SUMMARY_KEY = "refinery-seeds-summary"
_LIMITS: dict[str, threading.BoundedSemaphore] = {}  # flow run id -> seeds running at once


def _limit(jobs: int) -> threading.BoundedSemaphore:
    key = str(flow_run.get_id())
    return _LIMITS.setdefault(key, threading.BoundedSemaphore(jobs))


@task(name="seed", task_run_name="seed {seed}", cache_policy=NO_CACHE)
def run_seed(seed: int, name: str, overrides: dict[str, Any], workspace: str,
             jobs: int) -> dict[str, Any]:
    """One seed's pipeline as a DVC experiment; its evaluation metrics."""
    logger = get_run_logger()
    with _limit(jobs):
        logger.info("seed %d: dvc exp run --temp -n %s", seed,
                    seeds_lib.experiment_names(name, [seed])[0])
        metrics = seeds_lib.run_one(seed, name=name, overrides=overrides, repo=Path(workspace),
                                    threads=max(1, (os.cpu_count() or 1) // jobs))
    logger.info("seed %d: done", seed)
    return metrics


@task(name="summarize-seeds", cache_policy=NO_CACHE)
def summarize_seeds(result: seeds_lib.SeedRun, overrides: dict[str, Any], workspace: str,
                    invocation: str) -> dict[str, Any]:
    _, record, markdown = seeds_lib.publish(result, overrides, invocation, Path(workspace))
    link = f"\n\nMLflow: [seeds {result.name}]({record.url})\n" if record.url else "\n"
    create_markdown_artifact(markdown + link, key=SUMMARY_KEY,
                             description="Seeds: mean, std and paired differences")
    return {"mlflow_run_id": record.run_id, "children": record.children,
            "missing": record.missing}


@flow(name=FLOW_NAME, description="the pipeline over several training seeds, as DVC "
      "experiments, then their summary", task_runner=ThreadPoolTaskRunner(max_workers=16))
def refinery_seeds(seeds: list[int] | None = None, jobs: int = 2, name: str | None = None,
                   overrides: dict[str, Any] | None = None,
                   workspace: str | None = None) -> dict[str, Any]:
    import time

    seeds = list(seeds if seeds is not None else [0, 1, 2, 3, 4])
    overrides = dict(overrides or {})
    root = Path(workspace or os.getcwd()).resolve()
    name = name or f"seeds-{flow_run.get_name() or time.strftime('%Y%m%d-%H%M%S')}"
    seeds_lib.check(seeds, name, jobs, overrides, root)  # before any work
    start = time.perf_counter()
    per_seed: dict[int, dict[str, Any]] = {}
    if seeds_lib.warm_data(overrides, root):
        get_run_logger().info("data stages up to date in %s", root)
        alone: list[int] = []
    else:  # the first seed runs the data stages
        alone = seeds[:1]
        per_seed[seeds[0]] = run_seed(seeds[0], name, overrides, str(root), 1)
    futures = {s: run_seed.submit(s, name, overrides, str(root), jobs)
               for s in seeds if s not in alone}
    per_seed.update({s: future.result() for s, future in futures.items()})
    result = seeds_lib.SeedRun(name, tuple(seeds), tuple(seeds_lib.experiment_names(name, seeds)),
                               per_seed, time.perf_counter() - start)
    invocation = (f"python -m pipelines.seeds --seeds {' '.join(map(str, seeds))} "
                  f"--jobs {jobs} --name {name}"
                  + "".join(f" --set {k}={v}" for k, v in overrides.items()))
    record = summarize_seeds(result, overrides, str(root), invocation)
    return {"name": name, "experiments": list(result.experiments), "seconds": result.seconds,
            **record}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run refinery-seeds once, here.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    print(refinery_seeds(seeds=args.seeds, jobs=args.jobs, name=args.name,
                         overrides=parse_assignments(args.set)))


if __name__ == "__main__":
    main()
