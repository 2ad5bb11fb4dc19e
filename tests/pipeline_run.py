"""One whole pipeline run for the session, through the Prefect flow, that many tests read.

The claims about trained models (every model above chance, the teacher
started from the pretrained backbone, the gate, the champion loading in a
fresh process, the flow's MLflow tree and summary artifact, identical reruns)
all hold for *one* digits run with small but learning settings. So it runs
once: the Prefect flow (``pipelines/flow.py``) against a real Prefect server
and a real MLflow server, each stage through ``dvc repro`` in a git+DVC copy
of the working tree, so the one run proves both doors. Tests that change
something (params, the registry) work on a copy of its workspace
(:func:`copy_of`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from servers import (
    BIN,
    MlflowServer,
    PrefectServer,
    run,
    workspace_copy,
    workspace_env,
)
from workspace import TINY_TRAINING

#: Small enough for two cores, large enough that every model learns (the real default
#: registry gate accepts the int8 student: min accuracy 0.8, at most 5 points below the
#: teacher) and the pretrained backbone's kNN accuracy is well above chance.
SETTINGS: dict[str, Any] = {
    **TINY_TRAINING,
    "finetune.epochs": 10,
    "distill.epochs": 6,
    "prune.epochs": 8,
    "quantize.calibration_images": 128,
    "evaluate.latency.warmup": 2,
    "evaluate.latency.iterations": 10,
    "evaluate.latency.throughput_iterations": 2,
}
SCRIPT = """
import json, sys
from pipelines.flow import refinery_pipeline
result = refinery_pipeline()
print("RESULT " + json.dumps(result))
"""
_SHARED: dict[str, Any] = {}


@dataclass(frozen=True)
class PipelineRun:
    ws: Path  # the workspace the flow ran in (read it; change a copy_of it)
    env: dict[str, str]  # stage processes' environment (MLflow server, PYTHONPATH)
    result: dict[str, Any]  # what the flow returned: pipeline id and per-stage results
    flow_run_id: str
    mlflow: MlflowServer
    prefect: PrefectServer

    def json(self, relative: str) -> Any:
        return json.loads((self.ws / relative).read_text())

    def copy_of(self, target: Path) -> Path:
        """A copy of the workspace (git and DVC state included) to change freely."""
        shutil.copytree(self.ws, target, symlinks=True)
        return target


@pytest.fixture(scope="session")
def pipeline_run(mlflow_server: MlflowServer, prefect_server: PrefectServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineRun]:
    """The session's whole-pipeline run (see the module doc); made on first use."""
    if "run" not in _SHARED:
        root = tmp_path_factory.mktemp("pipeline-run")
        ws = workspace_copy(root / "ws", cache=root / "dvc-cache", overrides=SETTINGS)
        env = workspace_env(ws, {"MLFLOW_TRACKING_URI": mlflow_server.uri,
                                 **prefect_server.client_env()})
        out = run([str(BIN / "python"), "-c", SCRIPT], ws, env, timeout=1800)
        result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
        flow_run_id = result["pipeline_id"].removeprefix("prefect-")
        _SHARED["run"] = PipelineRun(ws, env, result, flow_run_id, mlflow_server,
                                     prefect_server)
    yield _SHARED["run"]
