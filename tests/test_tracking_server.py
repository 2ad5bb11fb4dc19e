"""The tracking module against a real ``mlflow server`` over HTTP (no pipeline, fast).

Covers the run tree (parent + children, reused stages tagged with the run
that produced them), lineage files, fail-fast on an unreachable server, the
``defer`` spool and its replay (which waits for a live writer process, not a killed
one), and a server lost in the middle of a stage
(a real TCP partition in front of the real server): the stage fails, records
nothing, and the next stage runs once the server is back.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from servers import (
    REPO,
    MlflowServer,
    TcpProxy,
    children,
    free_port,
    parents,
    tool_env,
)

from refinery import fsutil, lineage, paths, tracking
from refinery.errors import RefineryError
from refinery.params import load_params
from refinery.pipeline import recorded_with

pytestmark = pytest.mark.slow


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder laid out like the repo root, as the working directory of the 'stages'."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REFINERY_TRACKING_SPOOL", str(tmp_path / "spool"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a dead server costs ~1 s
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv(tracking.FLOW_RUN_ID_ENV, raising=False)
    return tmp_path


def _pipeline(monkeypatch: pytest.MonkeyPatch) -> str:
    pid = f"test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv(tracking.PIPELINE_ID_ENV, pid)
    return pid


def _fake_stage(stage: str, metrics: dict[str, float], steps: int = 3, **kwargs) -> str:
    """What an adapter does: open the run, work, write outputs, log them."""
    kwargs.setdefault("full_params", load_params(Path("params.yaml")).to_dict())
    with tracking.stage_run(stage, {"seed": 0, "images": {"side": 8}},
                            recorded=recorded_with(stage), **kwargs) as run:
        for step in range(steps):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        report = Path("reports") / stage / "report.txt"
        fsutil.write_text(report, f"{stage} report\n")
        run.log_artifact(report, "reports")
        fsutil.write_json(paths.metrics_file(stage), metrics)
        run.log_metrics(metrics)
        return run.run_id


def test_run_tree_lineage_and_reuse(mlflow_server: MlflowServer, workspace: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    client = mlflow_server.client()
    first = _pipeline(monkeypatch)
    download_id = _fake_stage("download", {"train_records": 10.0})
    validate_id = _fake_stage("validate", {"rows": 12.0})

    (parent,) = [p for p in parents(client) if p.data.tags["refinery.pipeline_id"] == first]
    kids = children(client, parent.info.run_id)
    assert {k: r.info.run_id for k, r in kids.items()} == {"download": download_id,
                                                           "validate": validate_id}
    assert all(r.info.status == "FINISHED" for r in kids.values())
    source = kids["download"].data.tags  # MLflow's own source tags, as start_run sets them
    assert source["mlflow.user"] and source["mlflow.source.type"] == "LOCAL"
    assert source["mlflow.source.name"] and parent.data.tags["mlflow.user"]
    assert len(client.get_metric_history(download_id, "loss")) == 3
    assert [a.path for a in client.list_artifacts(download_id, "reports")] == [
        "reports/report.txt"]
    tags, params, metrics = parent.data.tags, parent.data.params, parent.data.metrics
    assert params["prepare.label_fraction"] == "0.1"  # the full params, not a stage's subset
    assert tags["refinery.stage.download"] == download_id
    assert tags["refinery.stage.download.state"] == "executed"
    assert metrics["download.train_records"] == 10.0
    record = lineage.read("validate")
    assert record is not None and record.run_id == validate_id
    assert record.parent_run_id == parent.info.run_id and record.pipeline_id == first

    # A second execution that only runs validate: download is reused, and the
    # parent points at the run that produced its outputs.
    second = _pipeline(monkeypatch)
    again = _fake_stage("validate", {"rows": 12.0})
    (parent2,) = [p for p in parents(client) if p.data.tags["refinery.pipeline_id"] == second]
    assert set(children(client, parent2.info.run_id)) == {"validate"}
    assert parent2.data.tags["refinery.stage.download"] == download_id
    assert parent2.data.tags["refinery.stage.download.state"] == "reused"
    assert parent2.data.tags["refinery.stage.validate"] == again
    assert parent2.info.status == "FINISHED"


def test_failed_stage_marks_child_and_parent(mlflow_server: MlflowServer,
                                             workspace: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    pid = _pipeline(monkeypatch)
    with pytest.raises(RefineryError, match="bad data"), \
            tracking.stage_run("validate", {"seed": 0}):
        raise RefineryError("bad data")
    client = mlflow_server.client()
    (parent,) = [p for p in parents(client) if p.data.tags["refinery.pipeline_id"] == pid]
    child = children(client, parent.info.run_id)["validate"]
    assert child.info.status == "FAILED" and "bad data" in child.data.tags["refinery.error"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["refinery.stage.validate.state"] == "failed"
    assert lineage.read("validate") is None  # no record of a run that did not finish


def test_unreachable_server_fails_fast_before_work(workspace: Path, loopback_server: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail fast: one health check, answered 503, and not a single MLflow API call or retry
    (MLflow's own client would retry each call for minutes)."""
    loopback_server.serve("/health", status=503)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", loopback_server.base_url)
    _pipeline(monkeypatch)
    worked = False
    with pytest.raises(tracking.TrackingUnavailable, match=r"answered HTTP 503.*did not start"), \
            tracking.stage_run("prepare", {"seed": 0}):
        worked = True
    assert not worked
    assert [r.path for r in loopback_server.requests] == ["/health"]
    assert not Path("lineage").exists()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listening: refused at once

    # Through the CLI: one clean line on stderr, exit 1, no traceback.
    result = subprocess.run([sys.executable, "-m", "refinery", "validate"], cwd=workspace,
                            env=tool_env({"MLFLOW_TRACKING_URI": dead}), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"refinery validate: MLflow tracking server {dead} is unreachable" in result.stderr
    assert "tracking.on_unreachable: defer" in result.stderr


def test_defer_spools_and_replays(mlflow_server: MlflowServer, workspace: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    pid = _pipeline(monkeypatch)
    spool_id = _fake_stage("download", {"train_records": 7.0}, on_unreachable="defer")
    record = lineage.read("download")
    assert record is not None and record.deferred and record.run_id is None
    assert record.spool_run_id == spool_id
    assert Path("metrics/download.json").exists()  # outputs never depend on the server

    report = tracking.sync_spool(uri=mlflow_server.uri)
    assert spool_id in report.replayed
    client = mlflow_server.client()
    (parent,) = [p for p in parents(client) if p.data.tags["refinery.pipeline_id"] == pid]
    child = children(client, parent.info.run_id)["download"]
    assert child.info.run_id == report.replayed[spool_id]
    assert child.data.tags["refinery.spool_run"] == spool_id
    assert child.info.status == "FINISHED"
    assert len(client.get_metric_history(child.info.run_id, "loss")) == 3
    assert child.data.metrics["train_records"] == 7.0
    assert client.list_artifacts(child.info.run_id, "reports")
    assert parent.data.tags["refinery.stage.download.state"] == "executed"
    channel = tracking.Channel(uri=mlflow_server.uri)
    assert channel.resolve(record) == child.info.run_id
    assert tracking.sync_spool(uri=mlflow_server.uri).replayed == {}  # nothing left


_WRITER = """
import sys, time
from refinery import tracking
with tracking.stage_run("prepare", {"seed": 0}, on_unreachable="defer") as run:
    run.log_metrics({"loss": 1.0}, step=0)
    run.flush()
    print(run.run_id, flush=True)
    time.sleep(600)
"""


def test_replay_waits_for_a_writing_process_not_for_a_killed_one(
        mlflow_server: MlflowServer, workspace: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay while another process still writes to the spool would copy half a run and
    delete it under the writer: it sends nothing then. Once the writer is SIGKILLed (no
    clean-up of its own), the kernel has dropped its lock and the next replay sends it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    pid = _pipeline(monkeypatch)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER], cwd=workspace, text=True,
                              stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None
        spool_id = writer.stdout.readline().strip()
        assert spool_id, "the writer process did not start its spooled run"
        busy = tracking.sync_spool(uri=mlflow_server.uri)
        assert busy.busy and busy.replayed == {}
        assert "another process is writing to the spool" in str(busy)
    finally:
        writer.kill()
        writer.wait(timeout=60)

    report = tracking.sync_spool(uri=mlflow_server.uri)
    assert not report.busy and spool_id in report.replayed
    client = mlflow_server.client()
    (parent,) = [p for p in parents(client) if p.data.tags["refinery.pipeline_id"] == pid]
    child = children(client, parent.info.run_id)["prepare"]
    assert child.info.run_id == report.replayed[spool_id]
    assert child.info.status == "RUNNING"  # as the killed writer left it, not made up
    assert [m.value for m in client.get_metric_history(child.info.run_id, "loss")] == [1.0]
    assert tracking.sync_spool(uri=mlflow_server.uri).replayed == {}


def test_server_lost_mid_stage_fails_the_stage_and_records_nothing(
        mlflow_server: MlflowServer, workspace: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No mid-stage failover: past MLflow's retries the stage fails with a one-line
    TrackingUnavailable, writes no lineage (DVC records nothing, so the next repro runs
    it again), and the next stage works as soon as the server is back."""
    proxy = TcpProxy(mlflow_server.port).restore()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
    pid = _pipeline(monkeypatch)
    try:
        with pytest.raises(tracking.TrackingUnavailable,
                           match=r"lost the MLflow tracking server .* during stage 'prepare'"), \
                tracking.stage_run("prepare", {"seed": 0}) as run:
            run.log_metrics({"loss": 1.0}, step=0)
            run.flush()
            proxy.cut()  # the server vanishes in the middle of the stage
            run.log_metrics({"loss": 0.5}, step=1)
            run.flush()
            pytest.fail("a flush to a lost server must raise")
    finally:
        proxy.restore()
    assert lineage.read("prepare") is None
    assert not Path("mlflow/spool").exists() and not Path("spool").exists()  # no failover

    _fake_stage("augment", {"policies": 2.0})
    client = mlflow_server.client()
    (parent,) = [p for p in parents(client) if p.data.tags["refinery.pipeline_id"] == pid]
    kids = children(client, parent.info.run_id)
    assert set(kids) == {"prepare", "augment"}
    assert kids["prepare"].info.run_id == run.run_id
    assert len(client.get_metric_history(run.run_id, "loss")) == 1  # what reached the server
    assert "refinery.stage.prepare" not in parent.data.tags
    assert kids["augment"].info.status == "FINISHED"


def test_model_logging_and_registry_follow_the_channel(
        mlflow_server: MlflowServer, workspace: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage code that calls MLflow directly (the evaluate stage registers models) logs
    to the server, or to the spool while deferred, with no change on its side."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name = f"refinery-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    _pipeline(monkeypatch)
    with tracking.stage_run("evaluate", {"seed": 0}) as run, run.active() as live:
        assert live
        mlflow.pyfunc.log_model(name="model", python_model=_Echo(), pip_requirements=[],
                                registered_model_name=name)
        MlflowClient().set_registered_model_alias(name, "candidate", "1")
    client = mlflow_server.client()
    assert [v.run_id for v in client.search_model_versions(f"name = '{name}'")] == [run.run_id]
    assert client.get_model_version_by_alias(name, "candidate").version == "1"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    _pipeline(monkeypatch)
    with tracking.stage_run("evaluate", {"seed": 0}, on_unreachable="defer") as run, \
            run.active() as live:
        assert not live
        mlflow.pyfunc.log_model(name="model", python_model=_Echo(), pip_requirements=[],
                                registered_model_name=name)
    report = tracking.sync_spool(uri=mlflow_server.uri)
    assert report.models_not_replayed == [f"{name} v1"]  # stays in the spool store, said so
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


class _Echo:
    """The smallest pyfunc model (wrapped lazily so importing this module stays light)."""

    def __new__(cls):
        import mlflow.pyfunc

        class Echo(mlflow.pyfunc.PythonModel):
            def predict(self, context: object, model_input: list[str]) -> list[str]:
                return model_input

        return Echo()
