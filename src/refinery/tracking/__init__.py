"""The one package that talks to MLflow; stages log through the :class:`StageRun` that
:func:`stage_run` opens (via :func:`refinery.stage.tracked`) and never import mlflow.

:mod:`.context` says who launched an execution, :mod:`.channel` where its records go
(the server, or while it is unreachable the spool, replayed later), :mod:`.runs` what
they are: a parent run per execution, a child run per stage it executed, the seeds run.
README.md ("The MLflow run tree") says what the runs carry; mlflow/README.md what an
unreachable server or one lost mid-stage costs.
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
