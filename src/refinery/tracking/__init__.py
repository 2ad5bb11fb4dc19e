"""The one package that talks to MLflow: where runs go, how they nest, what is kept.

Stages log through the :class:`StageRun` that :func:`stage_run` opens (via
:func:`refinery.stage.tracked`); they never import mlflow. Every pipeline
execution is one parent run and every stage that executes is a child of it;
the stages of one execution find their parent through a pipeline id (the
``REFINERY_PIPELINE_ID`` environment variable an orchestrator sets, else the
``dvc repro``/``dvc exp run`` process that launched them).

The server is checked once, when a stage starts: unreachable, the stage fails
before any work (``tracking.on_unreachable: fail``, the default) or runs
against the local spool (``defer``; :mod:`.channel`), replayed by the next
stage that finds the server up, the Prefect flow at its end, or ``refinery
sync-tracking``. A server lost *during* a stage is ridden out by MLflow's own
retries (about a minute); past them the stage fails with
:class:`TrackingUnavailable` and DVC records nothing for it, so the next ``dvc
repro`` runs it again.

Modules: :mod:`.context` (who launched the execution, and what it ran on),
:mod:`.channel` (where records go: server or spool, and the spool's replay),
:mod:`.runs` (stage, pipeline and seeds runs).
"""

from refinery.tracking.channel import Channel, TrackingUnavailable, run_url, sync_spool
from refinery.tracking.context import FLOW_RUN_ID_ENV, PIPELINE_ID_ENV, RunContext, git_commit
from refinery.tracking.runs import (
    DVC_EXPERIMENT_TAG,
    NullRun,
    PipelineRecord,
    SeedsRecord,
    StageRun,
    begin_pipeline,
    end_pipeline,
    record_seeds,
    stage_run,
)

__all__ = [
    "DVC_EXPERIMENT_TAG", "FLOW_RUN_ID_ENV", "PIPELINE_ID_ENV", "Channel", "NullRun",
    "PipelineRecord", "RunContext", "SeedsRecord", "StageRun", "TrackingUnavailable",
    "begin_pipeline", "end_pipeline", "git_commit", "record_seeds", "run_url",
    "stage_run", "sync_spool",
]
