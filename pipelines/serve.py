"""One-command local scheduler: ``python -m pipelines.serve`` (or ``python pipelines/serve.py``).

Serves the same two deployments as ``pipelines/prefect.yaml`` (the nightly
retrain and the on-demand run) from one long-lived process, with no work
pool or worker to set up: good for a laptop or a single training box. The
process must run from the repository root (its working directory is the
pipeline's workspace) and needs ``PREFECT_API_URL`` pointing at a server
(``prefect server start``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from pipelines import dvcfile
from pipelines.flow import refinery_pipeline
from refinery.params import ParamsError, apply_overrides, parse_params
from refinery.profiles import parse_assignments

NIGHTLY_CRON = "0 2 * * *"


def build_deployments(cron: str = NIGHTLY_CRON, timezone: str = "UTC",
                      overrides: dict[str, Any] | None = None,
                      stop_after: str | None = None, interval_s: float | None = None
                      ) -> list[Any]:
    """The nightly and on-demand deployments, one execution at a time (like prefect.yaml).

    ``overrides`` and ``stop_after`` become the nightly run's parameters (validated by
    the flow like any run's, before any work); ``interval_s`` replaces the cron with a
    fixed interval (e.g. hourly).
    """
    from prefect.schedules import Cron, Interval

    schedule = Interval(interval_s) if interval_s else Cron(cron, timezone=timezone)
    nightly = refinery_pipeline.to_deployment(
        name="nightly", schedule=schedule, tags=["refinery", "nightly"],
        concurrency_limit=1,
        parameters={"overrides": dict(overrides or {}), "stop_after": stop_after},
        description="Nightly retrain: every stage of dvc.yaml through dvc repro.",
    )
    on_demand = refinery_pipeline.to_deployment(
        name="on-demand", tags=["refinery", "on-demand"], concurrency_limit=1,
        parameters={"overrides": {}, "stop_after": None},
        description="A run when you ask for one, with param overrides and stop_after.",
    )
    return [nightly, on_demand]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cron", default=NIGHTLY_CRON, help="nightly schedule (cron)")
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                        help="run every SECONDS instead of on the cron")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="assignments",
                        help="a params override for the scheduled runs (repeatable)")
    parser.add_argument("--stop-after", default=None, metavar="STAGE",
                        help="scheduled runs stop after this stage")
    args = parser.parse_args(argv)
    try:
        overrides = _checked(args.assignments, args.stop_after)
    except (ParamsError, dvcfile.DvcFileError) as exc:
        parser.exit(2, f"pipelines.serve: {exc}\n")
    from prefect import serve

    serve(*build_deployments(args.cron, args.timezone, overrides, args.stop_after,
                             args.interval))


def _checked(assignments: list[str], stop_after: str | None) -> dict[str, Any]:
    """Refuse a bad schedule now, not at 02:00: the overrides against the params schema,
    the stop stage against dvc.yaml (both of the working directory, the served workspace)."""
    overrides = parse_assignments(assignments)
    raw = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")) or {}
    parse_params(apply_overrides(raw, overrides), source="params.yaml + --set")
    dvcfile.plan(Path("dvc.yaml"), stop_after)
    return overrides


if __name__ == "__main__":
    main()
