"""Repeated seeds on real machinery: DVC's queue, a real MLflow server, a real Prefect server.

One workspace (tiny epochs), two runs of three seeds each:

1. ``refinery seeds --seeds 0 1 2 --jobs 2``: DVC experiments from ``dvc exp run
   --queue``; seed 0 runs alone and leaves the data stages in the run-cache,
   seeds 1 and 2 restore them and train at the same time.
2. ``python -m pipelines.seeds --seeds 3 4 5 --jobs 2`` against a Prefect
   server: one task per seed, seeds 4 and 5 at the same time.

Each leaves ``reports/seeds/``, the experiments in ``dvc exp show``, and one
MLflow parent run whose children are the seeds' pipeline runs.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pipeline_run import SETTINGS
from servers import BIN, children, run, runs, workspace_copy, workspace_env

from refinery.seeds import experiment_metrics, experiment_refs

pytestmark = pytest.mark.slow

#: The shared run's settings with even fewer epochs: these tests are about the machinery.
SEEDS_SETTINGS: dict[str, Any] = {
    **SETTINGS, "pretrain.epochs": 1, "finetune.epochs": 4, "distill.epochs": 1,
    "prune.epochs": 1, "quantize.calibration_images": 64, "quantize.qat_if_drop_above": 100.0,
}
DATA_STAGES = ("download", "validate", "prepare", "augment")


@pytest.fixture(scope="module")
def seeds_ws(tmp_path_factory: pytest.TempPathFactory, mlflow_server: Any,
             prefect_server: Any) -> Iterator[tuple[Path, dict[str, str]]]:
    root = tmp_path_factory.mktemp("seeds")
    ws = workspace_copy(root / "ws", overrides=SEEDS_SETTINGS)
    env = workspace_env(ws, {"MLFLOW_TRACKING_URI": mlflow_server.uri,
                             **prefect_server.client_env()})
    yield ws, env


def _exp_show(ws: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json``: experiment name -> its params and evaluate metrics."""
    out = run([str(BIN / "dvc"), "exp", "show", "--json"], ws, env).stdout
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict):
                found[node["name"]] = node["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(out))
    return found


def _window(run_: Any) -> tuple[int, int]:
    return run_.info.start_time, run_.info.end_time


def _check_summary(ws: Path, name: str, seeds: list[int]) -> None:
    """The report's means are the experiments' own numbers, averaged."""
    refs = experiment_refs(ws)
    per_seed = {s: experiment_metrics(ws, refs[f"{name}-seed{s}"]) for s in seeds}
    rows = {(r["row"], r["metric"]): r
            for r in csv.DictReader((ws / "reports/seeds/summary.csv").open())}
    for model in ("scratch", "teacher", "student_int8", "majority", "linear_probe"):
        values = [per_seed[s][model]["accuracy"] for s in seeds]
        row = rows[(model, "accuracy")]
        assert float(row["mean"]) == pytest.approx(sum(values) / len(values)), model
        assert [float(row[f"seed_{s}"]) for s in seeds] == pytest.approx(values)
    diff = rows[("teacher - scratch", "accuracy")]
    assert [float(diff[f"seed_{s}"]) for s in seeds] == pytest.approx(
        [per_seed[s]["teacher"]["accuracy"] - per_seed[s]["scratch"]["accuracy"]
         for s in seeds])
    text = (ws / "reports/seeds/summary.md").read_text()
    assert f"# Seeds: {name}" in text and "- Pretraining: teacher minus scratch = " in text
    assert (ws / "reports/seeds/summary.png").read_bytes()[:4] == b"\x89PNG"


def _check_mlflow(mlflow_server: Any, name: str, seeds: list[int]) -> dict[str, Any]:
    """One seeds run; its children are the seeds' pipeline runs; returns them by seed."""
    client = mlflow_server.client()
    (parent,) = runs(client, query=f"tags.`refinery.seeds_name` = '{name}'")
    assert parent.data.tags["refinery.role"] == "seeds"
    assert parent.data.metrics["seeds"] == len(seeds)
    assert "teacher_minus_scratch.accuracy_mean" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "seeds")}
    assert artifacts == {"seeds/summary.md", "seeds/summary.csv", "seeds/summary.png"}
    pipelines = runs(client, query=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_experiment = {r.data.tags["refinery.dvc_experiment"]: r for r in pipelines}
    assert set(by_experiment) == {f"{name}-seed{s}" for s in seeds}
    assert all(r.data.tags["refinery.role"] == "pipeline" for r in pipelines)
    return {s: by_experiment[f"{name}-seed{s}"] for s in seeds}


def _check_data_reused_and_overlap(mlflow_server: Any, pipelines: dict[int, Any],
                                   concurrent: tuple[int, int], first_ran_data: bool) -> None:
    client = mlflow_server.client()
    stages = {s: children(client, p.info.run_id) for s, p in pipelines.items()}
    if first_ran_data:  # a fresh workspace: the first seed ran the data stages ...
        assert set(DATA_STAGES) <= set(stages[min(pipelines)])
    for seed in concurrent:  # ... the others restored them from DVC's run-cache
        assert not set(DATA_STAGES) & set(stages[seed]), sorted(stages[seed])
        assert {"pretrain", "finetune", "evaluate"} <= set(stages[seed])
    a, b = (_window(stages[s]["pretrain"]) for s in concurrent)
    assert a[0] < b[1] and b[0] < a[1], "the two seeds did not train at the same time"


def test_refinery_seeds_runs_dvc_experiments_two_at_a_time(seeds_ws, mlflow_server) -> None:
    ws, env = seeds_ws
    done = subprocess.run([str(BIN / "refinery"), "seeds", "--seeds", "0", "1", "2",
                           "--jobs", "2", "--name", "cli"], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "refinery seeds: 3 seeds in" in done.stdout
    shown = _exp_show(ws, env)
    for seed in (0, 1, 2):
        data = shown[f"cli-seed{seed}"]
        assert data["params"]["params.yaml"]["data"]["seed"] == seed
        assert data["params"]["params.yaml"]["data"]["data_seed"] == 0
        assert "metrics/evaluate.json" in data["metrics"]
    _check_summary(ws, "cli", [0, 1, 2])
    pipelines = _check_mlflow(mlflow_server, "cli", [0, 1, 2])
    _check_data_reused_and_overlap(mlflow_server, pipelines, (1, 2), first_ran_data=True)

    again = subprocess.run([str(BIN / "refinery"), "seeds", "--seeds", "2", "--name", "cli"],
                           cwd=ws, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "exist already" in again.stderr


def test_the_prefect_seeds_flow_fans_seeds_out_as_tasks(seeds_ws, mlflow_server,
                                                        prefect_server) -> None:
    ws, env = seeds_ws
    done = subprocess.run([str(BIN / "python"), "-m", "pipelines.seeds", "--seeds", "3", "4",
                           "5", "--jobs", "2", "--name", "flow"], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (flow_run,) = prefect_server.api("POST", "/flow_runs/filter", {
        "flows": {"name": {"any_": ["refinery-seeds"]}}})
    assert flow_run["state_type"] == "COMPLETED"
    tasks = {t["name"]: t for t in prefect_server.api("POST", "/task_runs/filter", {
        "flow_runs": {"id": {"any_": [flow_run["id"]]}}})}
    assert {"seed 3", "seed 4", "seed 5", "summarize-seeds"} <= set(tasks)
    assert all(t["state_type"] == "COMPLETED" for t in tasks.values())

    def window(task_run: dict[str, Any]) -> tuple[datetime, datetime]:
        return (datetime.fromisoformat(task_run["start_time"]),
                datetime.fromisoformat(task_run["end_time"]))

    (s4, e4), (s5, e5), (_, e3) = (window(tasks[f"seed {s}"]) for s in (4, 5, 3))
    assert s4 < e5 and s5 < e4, "seeds 4 and 5 did not run at the same time"
    assert e3 <= min(s4, s5)  # seed 3 ran alone first
    artifacts = prefect_server.api("POST", "/artifacts/filter", {
        "artifacts": {"key": {"any_": ["refinery-seeds-summary"]}}})
    assert artifacts and "# Seeds: flow" in artifacts[0]["data"]
    shown = _exp_show(ws, env)
    assert {f"flow-seed{s}" for s in (3, 4, 5)} <= set(shown)
    _check_summary(ws, "flow", [3, 4, 5])
    pipelines = _check_mlflow(mlflow_server, "flow", [3, 4, 5])
    _check_data_reused_and_overlap(mlflow_server, pipelines, (4, 5), first_ran_data=False)
