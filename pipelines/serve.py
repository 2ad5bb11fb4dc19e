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
from typing import Any

from pipelines.flow import refinery_pipeline

NIGHTLY_CRON = "0 2 * * *"


def build_deployments(cron: str = NIGHTLY_CRON, timezone: str = "UTC") -> list[Any]:
    """The nightly and on-demand deployments, one execution at a time (like prefect.yaml)."""
    from prefect.schedules import Cron

    nightly = refinery_pipeline.to_deployment(
        name="nightly", schedule=Cron(cron, timezone=timezone), tags=["refinery", "nightly"],
        concurrency_limit=1,
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
    args = parser.parse_args(argv)
    from prefect import serve

    serve(*build_deployments(args.cron, args.timezone))


if __name__ == "__main__":
    main()
