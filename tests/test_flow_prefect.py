"""The Prefect path end to end: real ``prefect server``, the deployments of
``pipelines/prefect.yaml`` registered with the CLI, a process worker, runs
triggered through the REST API, and a real ``mlflow server`` behind the stages.

The on-demand deployment runs download -> validate -> prepare with an
override; the checks are the README's promises: the flow run completes, its
tasks are dvc.yaml's stages in order, the summary artifact links the MLflow
runs, the MLflow tree is one parent per execution, a second identical run
reuses every stage, a bad override fails before any work, and a failing
network stage is retried and fails the flow with the stage's own message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import (
    BIN,
    MlflowServer,
    PrefectServer,
    children,
    exp_show,
    isolate_prefect_home,
    parents,
    run,
    wait_for,
    workspace_copy,
    workspace_env,
)

isolate_prefect_home()
pytestmark = pytest.mark.slow

STOP_AFTER = "prepare"  # the full pipeline is tests/test_flow_full_pipeline.py
PLAN = ["download", "validate", "prepare"]
OVERRIDES = {"prepare.label_fraction": 0.15}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer, mlflow_server: MlflowServer,
             dvc_cache: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The README's path: pool, deploy from the checkout, start a worker."""
    ws = workspace_copy(tmp_path_factory.mktemp("flow") / "ws", cache=dvc_cache)
    env = workspace_env(ws, {"MLFLOW_TRACKING_URI": mlflow_server.uri,
                             **prefect_server.client_env()})
    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", "refinery-process", "--type", "process"], ws, env)
    run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "pipelines/prefect.yaml"],
        ws, env)
    log = open(ws.parent / "worker.log", "wb")  # noqa: SIM115  (closed at teardown)
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "refinery-process"],
                              cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deployments = {d["name"]: d for d in prefect_server.api("POST", "/deployments/filter", {})}
    try:
        yield {"ws": ws, "env": env, "deployments": deployments,
               "worker_log": ws.parent / "worker.log"}
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        log.close()


def _trigger(server: PrefectServer, deployment: dict[str, Any], parameters: dict[str, Any],
             worker_log: Path, timeout_s: float = 900) -> dict[str, Any]:
    created = server.api("POST", f"/deployments/{deployment['id']}/create_flow_run",
                         {"parameters": parameters})

    def finished() -> dict[str, Any] | None:
        flow_run = server.api("GET", f"/flow_runs/{created['id']}")
        return flow_run if flow_run["state_type"] in TERMINAL else None

    try:
        return wait_for(finished, timeout_s, "the flow run to finish", interval_s=1.0)
    except AssertionError:
        raise AssertionError("flow run did not finish; worker log:\n"
                             + worker_log.read_text(errors="replace")[-6000:]) from None


def _logs(server: PrefectServer, flow_run_id: str) -> str:
    logs = server.api("POST", "/logs/filter", {
        "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC",
        "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


def _completed(server: PrefectServer, flow_run: dict[str, Any], worker_log: Path) -> None:
    """Assert the run completed; otherwise show why (its state, its logs, the worker's)."""
    if flow_run["state_type"] == "COMPLETED":
        return
    raise AssertionError(
        f"flow run {flow_run['state_type']}: {flow_run['state']['message']}\n"
        f"--- flow run logs ---\n{_logs(server, flow_run['id'])[-6000:]}\n"
        f"--- worker log ---\n{worker_log.read_text(errors='replace')[-4000:]}")


def _task_runs(server: PrefectServer, flow_run_id: str) -> list[dict[str, Any]]:
    return server.api("POST", "/task_runs/filter", {
        "flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})


def _artifacts(server: PrefectServer, flow_run_id: str) -> dict[str, dict[str, Any]]:
    found = server.api("POST", "/artifacts/filter",
                       {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found}


def _parent_of(client: Any, flow_run_id: str) -> Any:
    (parent,) = [p for p in parents(client)
                 if p.data.tags.get("refinery.prefect_flow_run_id") == flow_run_id]
    return parent


def test_deployments_registered(deployed: dict[str, Any]) -> None:
    nightly = deployed["deployments"]["nightly"]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["work_pool_name"] == "refinery-process"
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert deployed["deployments"]["on-demand"]["schedules"] == []
    step = nightly["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert Path(step["directory"]) == deployed["ws"]


def test_on_demand_run_builds_one_mlflow_tree(deployed: dict[str, Any],
                                              prefect_server: PrefectServer,
                                              mlflow_server: MlflowServer) -> None:
    ws, on_demand = deployed["ws"], deployed["deployments"]["on-demand"]
    params_before = (ws / "params.yaml").read_bytes()
    parameters = {"stop_after": STOP_AFTER, "overrides": OVERRIDES}
    first = _trigger(prefect_server, on_demand, parameters, deployed["worker_log"])
    _completed(prefect_server, first, deployed["worker_log"])
    tasks = _task_runs(prefect_server, first["id"])
    assert [t["name"] for t in tasks] == PLAN
    assert all(t["state_type"] == "COMPLETED" for t in tasks)
    assert (ws / "params.yaml").read_bytes() == params_before  # the user's file, untouched
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert lock["prepare"]["params"]["params.yaml"]["prepare"]["label_fraction"] == 0.15

    client = mlflow_server.client()
    parent = _parent_of(client, first["id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["prepare.label_fraction"] == "0.15"
    assert json.loads(parent.data.tags["refinery.overrides"]) == OVERRIDES
    kids = children(client, parent.info.run_id)
    assert "prepare" in kids  # a new label fraction: prepare ran; the rest may be cached
    assert client.list_artifacts(kids["prepare"].info.run_id)  # uploaded through the server
    for stage in PLAN:
        run_id = parent.data.tags[f"refinery.stage.{stage}"]
        produced = client.get_run(run_id)
        assert produced.data.tags["refinery.stage"] == stage
        assert produced.info.status == "FINISHED"
        state = parent.data.tags[f"refinery.stage.{stage}.state"]
        assert state == ("executed" if stage in kids else "reused")
    metrics = json.loads((ws / "metrics" / "prepare.json").read_text())
    for key, value in metrics.items():
        if isinstance(value, int | float):
            assert parent.data.metrics[f"prepare.{key}"] == pytest.approx(value)

    artifacts = _artifacts(prefect_server, first["id"])
    summary = artifacts["refinery-pipeline-summary"]["data"]
    assert "| prepare | executed |" in summary
    assert f"{mlflow_server.uri}/#/experiments/" in summary and parent.info.run_id in summary
    assert f"runs/{parent.info.run_id}?workflowType=machine_learning" in \
        artifacts["refinery-mlflow-run"]["data"]  # opens MLflow's training view

    # A run with overrides is a DVC experiment too, linked both ways with the MLflow parent.
    experiment = parent.data.tags["refinery.dvc_experiment"]
    assert experiment == "prefect-" + first["name"]
    shown = exp_show(ws, deployed["env"])
    assert shown[experiment]["params"]["params.yaml"]["data"]["prepare"]["label_fraction"] \
        == 0.15
    saved = shown[experiment]["metrics"]["metrics/prepare.json"]["data"]
    assert saved == metrics
    ref = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], ws,
              deployed["env"]).stdout.split()
    (exp_ref,) = [r for r in ref if r.endswith("/" + experiment)]
    message = run(["git", "log", "-1", "--format=%B", exp_ref], ws, deployed["env"]).stdout
    assert f"MLflow run {parent.info.run_id}" in message and first["id"] in message

    # The same request again: DVC has nothing to do, MLflow gets a parent
    # with no children that points at the runs that made the outputs.
    second = _trigger(prefect_server, on_demand, parameters, deployed["worker_log"])
    _completed(prefect_server, second, deployed["worker_log"])
    parent2 = _parent_of(client, second["id"])
    assert children(client, parent2.info.run_id) == {}
    for stage in PLAN:
        assert parent2.data.tags[f"refinery.stage.{stage}.state"] == "reused"
    assert parent2.data.tags["refinery.stage.prepare"] == kids["prepare"].info.run_id


def test_bad_override_fails_before_any_work(deployed: dict[str, Any],
                                            prefect_server: PrefectServer) -> None:
    flow_run = _trigger(prefect_server, deployed["deployments"]["on-demand"],
                        {"overrides": {"prepare.label_fraction": 2}}, deployed["worker_log"])
    assert flow_run["state_type"] == "FAILED"
    assert "prepare.label_fraction" in flow_run["state"]["message"]
    assert _task_runs(prefect_server, flow_run["id"]) == []


def test_failing_network_stage_is_retried_then_fails_with_its_message(
        deployed: dict[str, Any], prefect_server: PrefectServer) -> None:
    ws = deployed["ws"]
    missing = "file:///nonexistent/refinery-test.tar.gz"
    flow_run = _trigger(prefect_server, deployed["deployments"]["on-demand"], {
        "stop_after": "download", "network_retries": 1, "retry_delay_s": 0.5,
        "overrides": {"download.source": "image-folder", "download.url": missing},
    }, deployed["worker_log"])
    assert flow_run["state_type"] == "FAILED"
    message = flow_run["state"]["message"]
    assert "refinery download: " in message and "/nonexistent/refinery-test.tar.gz" in message
    (task_run,) = _task_runs(prefect_server, flow_run["id"])
    assert task_run["name"] == "download" and task_run["run_count"] == 2  # one retry
    committed = run(["git", "show", "HEAD:params.yaml"], ws).stdout
    assert (ws / "params.yaml").read_text() == committed  # the override was undone
