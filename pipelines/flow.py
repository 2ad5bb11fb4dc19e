"""The Prefect flow: one task per stage of ``dvc.yaml``, each reproduced through DVC.

Why through DVC and not by calling the stage functions: DVC decides what is
stale and ``dvc.lock`` stays the one record of what produced what, so
``dvc repro`` and this flow are two doors into the same house. The flow adds
what DVC lacks: schedules, retries with backoff on the stages that touch the
network, logs and state in the Prefect UI, a summary artifact, and one
MLflow parent run per execution (its id goes to the stages through
``REFINERY_PIPELINE_ID``).

No stage logic lives here: the flow reads the stage list from ``dvc.yaml``,
edits ``params.yaml`` for overrides (see :mod:`pipelines.params_override`)
and runs ``dvc repro --single-item <stage>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from pipelines import dvcfile, params_override, report
from pipelines.dvc_runner import StageFailed, reproduce
from refinery import tracking
from refinery.dvctools import experiment_name, save_experiment, tool_env
from refinery.pipeline import dataset_roles

FLOW_NAME = "refinery-pipeline"
#: Stages that touch the network: retried with exponential backoff.
NETWORK_STAGES = frozenset({"download"})
SUMMARY_KEY = "refinery-pipeline-summary"


def pipeline_stages(workspace: Path | None = None) -> list[str]:
    """The flow's stage list: exactly ``dvc.yaml``'s, in its order."""
    root = workspace or Path.cwd()
    return [stage.name for stage in dvcfile.read_stages(root / "dvc.yaml")]


def _retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a network stage unless its params are wrong (no retry can fix those)."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as exc:  # the task's exception, re-raised by Prefect
            error = exc
    return not (isinstance(error, StageFailed) and error.params_error)


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, workspace: str, context_env: dict[str, str]) -> dict[str, Any]:
    """Reproduce one DVC stage; DVC skips it when nothing it depends on changed.

    ``context_env`` carries only the pipeline ids (task parameters are stored
    by Prefect, so the process environment, which may hold credentials, is
    merged here rather than passed in).
    """
    logger = get_run_logger()
    result = reproduce(stage, Path(workspace), tool_env(context_env), logger)
    logger.info("stage %s: %s in %.1fs", stage, result.dvc, result.seconds)
    return asdict(result)


def _publish(record: tracking.PipelineRecord, workspace: Path, stages: list[str],
             failed: bool, error: str | None) -> None:
    markdown = report.summary_markdown(record, workspace, stages, failed, error)
    create_markdown_artifact(markdown, key=SUMMARY_KEY,
                             description="Model comparison (or stage metrics) and MLflow runs")
    if record.parent_url:
        create_link_artifact(record.parent_url, link_text="MLflow pipeline run",
                             key="refinery-mlflow-run", description="The MLflow parent run")


@flow(name=FLOW_NAME, description="download -> ... -> evaluate, each stage through dvc repro",
      validate_parameters=True)
def refinery_pipeline(
    overrides: dict[str, Any] | None = None,
    stop_after: str | None = None,
    workspace: str | None = None,
    network_retries: int = 3,
    retry_delay_s: float = 10.0,
) -> dict[str, Any]:
    """Run the pipeline of ``dvc.yaml`` (up to ``stop_after``) with optional param overrides.

    ``overrides`` are dotted keys (``{"finetune.epochs": 3}``), validated by
    the params schema before any work. ``workspace`` is the repository
    (default: the working directory, which a deployment sets).
    """
    logger = get_run_logger()
    root = Path(workspace or os.getcwd()).resolve()
    plan = [stage.name for stage in dvcfile.plan(root / "dvc.yaml", stop_after)]
    context = tracking.RunContext.for_prefect(str(flow_run.id), flow_run.name, flow_run.ui_url)
    logger.info("stages: %s", " -> ".join(plan))
    with params_override.overridden(root, overrides) as params:
        full = params.to_dict()
        started = tracking.begin_pipeline(context, full, root, overrides)
        results: list[dict[str, Any]] = []
        error: str | None = None
        tags: dict[str, str] = {}
        try:
            for stage in plan:
                runner = run_stage
                if stage in NETWORK_STAGES:
                    runner = run_stage.with_options(
                        retries=network_retries,
                        retry_delay_seconds=exponential_backoff(backoff_factor=retry_delay_s),
                        retry_jitter_factor=0.5,
                        retry_condition_fn=_retryable,
                    )
                results.append(runner(stage, str(root), context.env()))
            if overrides:  # params.yaml still holds them: the workspace is the experiment
                tags = _save_experiment(context, started, root, plan, logger)
        except BaseException as exc:
            error = str(exc)
            raise
        finally:
            _finish(context, full, plan, root, error, logger, tags)
    return {"pipeline_id": context.pipeline_id, "stages": results,
            "dvc_experiment": tags.get(tracking.DVC_EXPERIMENT_TAG)}


def _save_experiment(context: tracking.RunContext, started: tracking.PipelineRecord,
                     root: Path, plan: list[str], logger: Any) -> dict[str, str]:
    """A run with overrides is a DVC experiment too (``dvc exp show`` lists it with its
    params and metrics): named after the flow run, its message names the MLflow parent,
    and the parent is tagged with its name."""
    name = experiment_name(context.prefect_flow_run_name, context.prefect_flow_run_id or "")
    message = (f"Prefect flow run {context.prefect_flow_run_id} "
               f"({context.prefect_flow_run_name}); MLflow run {started.parent_run_id}")
    save_experiment(root, name, message, plan)
    logger.info("DVC experiment %s (dvc exp show)", name)
    return {tracking.DVC_EXPERIMENT_TAG: name,
            "refinery.dvc_baseline_rev": tracking.git_commit(root) or ""}


def _finish(context: tracking.RunContext, params: Mapping[str, Any], plan: list[str],
            root: Path, error: str | None, logger: Any, tags: Mapping[str, str]) -> None:
    """Close the MLflow parent and publish the summary; never hides the stage's own error."""
    try:
        record = tracking.end_pipeline(context, params, plan, dataset_roles(plan), root,
                                       failed=error is not None, tags=tags)
        _publish(record, root, plan, error is not None, error)
        logger.info("MLflow parent run: %s", record.parent_url or record.parent_run_id)
    except Exception as exc:
        if error is None:
            raise
        logger.error("could not record the failed pipeline in MLflow: %s", exc)


if __name__ == "__main__":
    refinery_pipeline()
