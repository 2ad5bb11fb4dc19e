"""One whole pipeline run for the test session, through the Prefect flow, that many tests read.

The claims about trained models (every model above chance, the teacher
started from the pretrained backbone, the gate, the champion loading in a
fresh process, the flow's MLflow tree and summary artifact, identical reruns)
all hold for *one* digits run with small but learning settings. So it runs
once: the Prefect flow (``pipelines/flow.py``) against a real Prefect server
and a real MLflow team server (PostgreSQL, basic-auth), each stage through
``dvc repro`` in a git+DVC copy of the working tree, so the one run proves
both doors. Tests that change something (params, the registry) work on a copy
of its workspace (:func:`PipelineRun.copy_of`) or under their own registry names.

Once per session, not once per xdist worker: the first worker that collects a
test reading it starts this module as a background process (:func:`start_build`)
that owns the run's servers; the readers are moved to the end of the queue
(``tests/conftest.py``), so the other tests run while it trains, and every
worker attaches to its result. It stops when the session's main pytest process
ends (:func:`stop_build`, or it notices that process is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from servers import (
    BIN,
    PIPELINE_USER,
    MlflowServer,
    PostgresCluster,
    PrefectServer,
    TeamAuth,
    run,
    signed_in,
    start_team_mlflow,
    stop_team_mlflow,
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
#: The build gets this long (two cores shared with the other tests) before readers give up.
BUILD_TIMEOUT_S = 2400


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


def _folder(config: pytest.Config) -> Path:
    """The session's folder for the build: shared by the xdist workers (their base temp
    folders' parent) and known to the main process."""
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    return (base.parent if hasattr(config, "workerinput") else base) / "session-run"


def start_build(config: pytest.Config) -> None:
    """Start the build in the background unless some process of this session already did."""
    folder = _folder(config)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / "started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    # It lives as long as the session's main process: a worker's parent, else this one.
    owner = os.getppid() if hasattr(config, "workerinput") else os.getpid()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTEST_", "REFINERY_TEST_PREFECT_HOME"))}
    with open(folder / "build.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, __file__, str(folder), str(owner)], env=env,
                                cwd=Path(__file__).parent, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    (folder / "build.pid").write_text(str(proc.pid))


def stop_build(config: pytest.Config) -> None:
    """Stop the build's servers (the main process, at the session's end)."""
    pid_file = _folder(config) / "build.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by the worker that started it, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


def _build(folder: Path, owner: int) -> None:
    """The background process: servers up, the flow run, then serve until the session ends."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with signed_in(PIPELINE_USER):
        mlflow = start_team_mlflow(folder / "mlflow-server")
        try:
            prefect = PrefectServer(folder / "prefect-home").start()
            try:
                try:
                    _write_atomic(folder / "run.json", json.dumps(_run_flow(folder, mlflow,
                                                                            prefect)))
                except Exception:
                    _write_atomic(folder / "failed.txt", traceback.format_exc())
                while _alive(owner):
                    time.sleep(1)
            finally:
                prefect.stop()
        finally:
            stop_team_mlflow(mlflow)


def _run_flow(folder: Path, mlflow: MlflowServer, prefect: PrefectServer) -> dict[str, Any]:
    ws = workspace_copy(folder / "ws", cache=folder / "dvc-cache", overrides=SETTINGS)
    env = workspace_env(ws, {"MLFLOW_TRACKING_URI": mlflow.uri, **prefect.client_env()})
    out = run([str(BIN / "python"), "-c", SCRIPT], ws, env, timeout=1800)
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert mlflow.auth is not None and mlflow.database is not None
    return {"ws": str(ws), "env": env, "result": result,
            "mlflow": {"workdir": str(mlflow.workdir), "port": mlflow.port,
                       "admin_password_file": str(mlflow.auth.admin_password_file),
                       "auth_database": mlflow.auth.database_uri,
                       "database": [str(mlflow.database.root), mlflow.database.port]},
            "prefect": {"home": str(prefect.home), "port": prefect.port}}


def _attach(described: dict[str, Any]) -> PipelineRun:
    from servers import TEAM_USERS

    served = described["mlflow"]
    auth = TeamAuth(Path(served["admin_password_file"]), served["auth_database"], TEAM_USERS)
    root, port = served["database"]
    mlflow = MlflowServer(Path(served["workdir"]), port=served["port"], auth=auth,
                          database=PostgresCluster.attach(Path(root), port))
    prefect = PrefectServer(Path(described["prefect"]["home"]), port=described["prefect"]["port"])
    result = described["result"]
    return PipelineRun(Path(described["ws"]), described["env"], result,
                       result["pipeline_id"].removeprefix("prefect-"), mlflow, prefect)


@pytest.fixture(scope="session")
def pipeline_run(pytestconfig: pytest.Config) -> Iterator[PipelineRun]:
    """The session's whole-pipeline run (see the module doc), once it is built."""
    start_build(pytestconfig)  # already started by the first worker to collect a reader
    folder = _folder(pytestconfig)
    pid = int((folder / "build.pid").read_text()) if (folder / "build.pid").exists() else None
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while not (folder / "run.json").exists():
        log = (folder / "build.log").read_text(errors="replace")[-6000:] \
            if (folder / "build.log").exists() else ""
        if (folder / "failed.txt").exists():
            pytest.fail(f"the session's pipeline run failed:\n{(folder / 'failed.txt').read_text()}"
                        f"\n{log}", pytrace=False)
        if (pid is not None and not _alive(pid)) or time.monotonic() > deadline:
            pytest.fail(f"the session's pipeline run stopped without a result:\n{log}",
                        pytrace=False)
        time.sleep(1)
        if pid is None and (folder / "build.pid").exists():
            pid = int((folder / "build.pid").read_text())
    with signed_in(PIPELINE_USER):  # as the run's stages did, so its clients read it back
        yield _attach(json.loads((folder / "run.json").read_text()))


if __name__ == "__main__":
    _build(Path(sys.argv[1]), int(sys.argv[2]))
