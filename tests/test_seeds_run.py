"""Repeated seeds on real machinery: DVC's queue, a real MLflow server, a real Prefect server.

In a copy of the session's pipeline run (so the data stages are in the DVC
run-cache), with tiny training settings for every seed:

1. ``refinery seeds --seeds 0 1 --jobs 2``: the data stages are brought up to
   date in the workspace (restored), then both seeds train at the same time as
   DVC experiments (``dvc exp run --queue``, ``dvc queue start -j 2``).
2. then ``python -m pipelines.seeds --seeds 0 1 --jobs 2`` against a Prefect
   server, the same settings: one task per seed, both at once; every stage of
   both is restored from the run-cache the first run left, so the flow's
   experiments have exactly the first run's numbers.

Each leaves ``reports/seeds/``, the experiments in ``dvc exp show``, and one
MLflow run over the seeds. The second needs the first's run-cache, so both are
one test (two tests could land on different xdist workers). The seeds register
their models under names of their own: the session's ``champion`` is other
tests' to read.
"""

from __future__ import annotations

import csv
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pipeline_run import PipelineRun
from servers import BIN, children, exp_show, runs, workspace_env

from refinery.pipeline import data_stages
from refinery.seeds import experiment_metrics, experiment_refs

pytestmark = [pytest.mark.slow, pytest.mark.longest]

#: Tiny training for every seed: these tests are about the machinery.
TINY = ["pretrain.epochs=1", "finetune.epochs=3", "distill.epochs=1", "prune.epochs=1",
        "pretrain.min_steps=0", "distill.min_steps=0", "prune.min_steps=0",
        "quantize.calibration_images=64", "quantize.qat_if_drop_above=100.0",
        "registry.student_name=seeds-student-int8", "registry.teacher_name=seeds-teacher"]
SETS = [arg for item in TINY for arg in ("--set", item)]
DATA_STAGES = {stage.name for stage in data_stages()}


def _window(run_: Any) -> tuple[int, int]:
    return run_.info.start_time, run_.info.end_time


def _per_seed(ws: Path, name: str, seeds: list[int]) -> dict[int, dict[str, Any]]:
    refs = experiment_refs(ws)
    return {s: experiment_metrics(ws, refs[f"{name}-seed{s}"]) for s in seeds}


def _check_summary(ws: Path, name: str, seeds: list[int]) -> None:
    """The report's means are the experiments' own numbers, averaged."""
    per_seed = _per_seed(ws, name, seeds)
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


def _seeds_run(mlflow_server: Any, name: str, seeds: list[int]) -> tuple[Any, list[Any]]:
    """The one seeds run of ``name``, with its summary, and the pipeline runs under it."""
    client = mlflow_server.client()
    (parent,) = runs(client, query=f"tags.`refinery.seeds_name` = '{name}'")
    assert parent.data.tags["refinery.role"] == "seeds"
    assert parent.data.tags["refinery.dvc_experiments"] == ",".join(
        f"{name}-seed{s}" for s in seeds)
    assert parent.data.metrics["seeds"] == len(seeds)
    assert "teacher_minus_scratch.accuracy_mean" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "seeds")}
    assert artifacts == {"seeds/summary.md", "seeds/summary.csv", "seeds/summary.png"}
    return parent, runs(client, query=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def test_seeds_as_dvc_experiments_two_at_a_time_then_as_prefect_tasks(
        pipeline_run: PipelineRun, prefect_server: Any, tmp_path: Path) -> None:
    ws = pipeline_run.copy_of(tmp_path / "ws")
    env = workspace_env(ws, {"MLFLOW_TRACKING_URI": pipeline_run.mlflow.uri,
                             **prefect_server.client_env()})
    _refinery_seeds_runs_dvc_experiments_two_at_a_time(ws, env, pipeline_run)
    _the_prefect_seeds_flow_fans_seeds_out_as_tasks(ws, env, pipeline_run, prefect_server)


def _refinery_seeds_runs_dvc_experiments_two_at_a_time(ws: Path, env: dict[str, str],
                                                       pipeline_run: PipelineRun) -> None:
    done = subprocess.run([str(BIN / "refinery"), "seeds", "--seeds", "0", "1", "--jobs", "2",
                           "--name", "cli", *SETS], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "data stages up to date in the workspace" in done.stdout
    assert "refinery seeds: 2 seeds in" in done.stdout
    shown = exp_show(ws, env)
    for seed in (0, 1):
        data = shown[f"cli-seed{seed}"]
        params = data["params"]["params.yaml"]["data"]
        assert (params["seed"], params["data_seed"], params["finetune"]["epochs"]) == (seed, 0, 3)
        assert "metrics/evaluate.json" in data["metrics"]
    _check_summary(ws, "cli", [0, 1])

    _, pipelines = _seeds_run(pipeline_run.mlflow, "cli", [0, 1])
    by_seed = {int(r.data.tags["refinery.dvc_experiment"].rsplit("seed", 1)[1]): r
               for r in pipelines}
    assert set(by_seed) == {0, 1} and all(r.data.tags["refinery.role"] == "pipeline"
                                          for r in pipelines)
    client = pipeline_run.mlflow.client()
    stages = {s: children(client, r.info.run_id) for s, r in by_seed.items()}
    for seed in (0, 1):  # the data stages were restored from the run-cache, never run
        assert not DATA_STAGES & set(stages[seed]), sorted(stages[seed])
        assert {"pretrain", "finetune", "finetune_scratch", "evaluate"} <= set(stages[seed])
    a, b = (_window(stages[s]["pretrain"]) for s in (0, 1))
    assert a[0] < b[1] and b[0] < a[1], "the two seeds did not train at the same time"

    again = subprocess.run([str(BIN / "refinery"), "seeds", "--seeds", "1", "--name", "cli"],
                           cwd=ws, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "exist already" in again.stderr


def _the_prefect_seeds_flow_fans_seeds_out_as_tasks(ws: Path, env: dict[str, str],
                                                     pipeline_run: PipelineRun,
                                                     prefect_server: Any) -> None:
    done = subprocess.run([str(BIN / "python"), "-m", "pipelines.seeds", "--seeds", "0", "1",
                           "--jobs", "2", "--name", "flow", *SETS], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (flow_run,) = prefect_server.api("POST", "/flow_runs/filter", {
        "flows": {"name": {"any_": ["refinery-seeds"]}}})
    assert flow_run["state_type"] == "COMPLETED"
    tasks = prefect_server.api("POST", "/task_runs/filter", {
        "flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    by_name = {t["name"]: t for t in tasks}
    assert {"seed 0", "seed 1"} <= set(by_name)
    assert any(name.startswith("summarize-seeds") for name in by_name)
    assert all(t["state_type"] == "COMPLETED" for t in tasks)

    def window(task_run: dict[str, Any]) -> tuple[datetime, datetime]:
        return (datetime.fromisoformat(task_run["start_time"]),
                datetime.fromisoformat(task_run["end_time"]))

    (s0, e0), (s1, e1) = window(by_name["seed 0"]), window(by_name["seed 1"])
    assert s0 < e1 and s1 < e0, "the two seed tasks did not run at the same time"
    artifacts = prefect_server.api("POST", "/artifacts/filter", {
        "artifacts": {"key": {"any_": ["refinery-seeds-summary"]}}})
    assert artifacts and "# Seeds: flow" in artifacts[0]["data"]
    shown = exp_show(ws, env)
    assert {"flow-seed0", "flow-seed1"} <= set(shown)
    # the same params and code as the first run: DVC restored every stage from the
    # run-cache, so the numbers are the first run's, exactly
    assert _per_seed(ws, "flow", [0, 1]) == _per_seed(ws, "cli", [0, 1])
    _check_summary(ws, "flow", [0, 1])
    _, pipelines = _seeds_run(pipeline_run.mlflow, "flow", [0, 1])
    assert pipelines == []  # no stage ran, so no pipeline run was made ...
    assert "pipeline runs not found for ['flow-seed0', 'flow-seed1']" in done.stdout or \
        "'missing': ['flow-seed0', 'flow-seed1']" in done.stdout  # ... and it says so
