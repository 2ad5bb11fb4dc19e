"""Schedules that run: a real Prefect server's scheduler creates the run, ``serve`` runs it.

The nightly deployment is only worth something if the server's scheduler
service turns its cron into flow runs. With SQLAlchemy 2.1 it crashed on every
cycle and no scheduled run was ever created, while on-demand runs worked (so
nothing else caught it). Here ``python -m pipelines.serve --interval 5``
serves the README's deployments against a server whose scheduler is on (a
short interval instead of the nightly cron, so the first run is due at once;
the scheduler's code path is the same); the test waits for a run the
scheduler itself created (``auto_scheduled``) to complete, and fails on any
service error in the server's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import (
    PrefectServer,
    isolate_prefect_home,
    run,
    wait_for,
    workspace_copy,
    workspace_env,
)

isolate_prefect_home()

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def scheduling_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer(tmp_path_factory.mktemp("prefect-sched"), scheduler=True).start()
    try:
        yield server
    finally:
        server.stop()


def _serve(ws: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "pipelines.serve", *args], cwd=ws,
                                env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_scheduler_creates_a_run_that_serve_completes(
        scheduling_server: PrefectServer, dvc_cache: Path,
        tmp_path: Path) -> None:
    server = scheduling_server
    ws = workspace_copy(tmp_path / "ws", cache=dvc_cache)
    env = workspace_env(ws, server.client_env())
    log = tmp_path / "serve.log"
    serving = _serve(ws, env, log, "--interval", "5", "--stop-after", "download",
                     "--set", "download.test_fraction=0.25")
    try:
        def registered() -> dict[str, Any] | None:
            found = {d["name"]: d for d in server.api("POST", "/deployments/filter", {})}
            return found if {"nightly", "on-demand"} <= set(found) else None

        deployments = wait_for(registered, 120, "serve to register both deployments")
        nightly = deployments["nightly"]
        assert nightly["parameters"] == {"overrides": {"download.test_fraction": 0.25},
                                         "stop_after": "download"}

        def scheduled_run_done() -> dict[str, Any] | None:
            if serving.poll() is not None:
                raise AssertionError("pipelines.serve exited:\n" + log.read_text()[-4000:])
            for flow_run in server.api("POST", "/flow_runs/filter", {}):
                if (flow_run["deployment_id"] == nightly["id"] and flow_run["auto_scheduled"]
                        and flow_run["state_type"] in TERMINAL):
                    return flow_run
            return None

        try:
            flow_run = wait_for(scheduled_run_done, 300, "a scheduled run to finish", 2.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- server log ---\n{server.log_tail()}\n"
                                 f"--- serve log ---\n{log.read_text()[-4000:]}") from None
    finally:
        _stop(serving)
    assert flow_run["state_type"] == "COMPLETED", (flow_run["state"], log.read_text()[-4000:])
    assert "auto-scheduled" in flow_run["tags"]
    tasks = server.api("POST", "/task_runs/filter",
                       {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    assert [t["name"] for t in tasks] == ["download"]
    assert (ws / "data" / "raw" / "dataset.json").exists()
    on_demand = server.api("POST", "/flow_runs/filter", {
        "deployments": {"id": {"any_": [deployments["on-demand"]["id"]]}}})
    assert on_demand == []  # no schedule, no runs
    assert server.service_errors() == []


def test_serve_refuses_a_bad_schedule_before_serving(tmp_path: Path) -> None:
    """A typo in the nightly's params fails now, with the key, not at 02:00."""
    from servers import REPO, tool_env

    env = {**tool_env(), "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
           "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # never contacted
    bad_key = run([sys.executable, "-m", "pipelines.serve", "--set", "prepare.label_frac=0.2"],
                  REPO, env, timeout=120, check=False)
    assert bad_key.returncode == 2, bad_key.stderr
    assert "prepare.label_frac: unknown key" in bad_key.stderr
    bad_stage = run([sys.executable, "-m", "pipelines.serve", "--stop-after", "nope"], REPO,
                    env, timeout=120, check=False)
    assert bad_stage.returncode == 2 and "unknown stage 'nope'" in bad_stage.stderr


def test_serve_cron_becomes_the_nightly_schedule() -> None:
    from pipelines.serve import build_deployments

    nightly, on_demand = build_deployments("0 3 * * *", "Europe/Paris")
    assert nightly.schedules[0].schedule.cron == "0 3 * * *"
    assert nightly.schedules[0].schedule.timezone == "Europe/Paris"
    assert not on_demand.schedules
    (every,) = build_deployments(interval_s=3600)[0].schedules
    assert every.schedule.interval.total_seconds() == 3600
