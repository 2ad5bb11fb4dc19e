"""The whole pipeline through the Prefect flow: what the flow, Prefect and MLflow show of it.

The session's shared run (``tests/pipeline_run.py``): every stage of
``dvc.yaml`` as a Prefect task against a real Prefect server, each through
``dvc repro``, logging to a real MLflow server. Checked here: the flow ran
dvc.yaml's stages in order; the Prefect summary artifact carries the model
comparison and links every MLflow run; the comparison table has a row per
model and a sentence per comparison, with the numbers of the headline
metrics; the MLflow parent holds the headline metrics; the student was
registered by this execution.
"""

from __future__ import annotations

from typing import Any

import pytest
from pipeline_run import PipelineRun
from servers import REPO, children, parents

from pipelines import dvcfile
from pipelines.flow import SUMMARY_KEY
from refinery.params import flatten
from refinery.pipeline import MODELS

pytestmark = pytest.mark.slow

DVC_STAGES = [s.name for s in dvcfile.read_stages(REPO / "dvc.yaml")]


def _parent(run: PipelineRun) -> Any:
    client = run.mlflow.client()
    (parent,) = [p for p in parents(client)
                 if p.data.tags["refinery.pipeline_id"] == run.result["pipeline_id"]]
    return parent


def test_the_flow_ran_every_stage_of_dvc_yaml_in_order(pipeline_run: PipelineRun) -> None:
    assert [s["stage"] for s in pipeline_run.result["stages"]] == DVC_STAGES
    server = pipeline_run.prefect
    flow_run = server.api("GET", f"/flow_runs/{pipeline_run.flow_run_id}")
    assert flow_run["state_type"] == "COMPLETED"
    tasks = server.api("POST", "/task_runs/filter", {
        "flow_runs": {"id": {"any_": [pipeline_run.flow_run_id]}},
        "sort": "EXPECTED_START_TIME_ASC"})
    assert [t["name"] for t in tasks] == DVC_STAGES
    assert all(t["state_type"] == "COMPLETED" for t in tasks)


def test_the_comparison_states_every_model_and_every_step(pipeline_run: PipelineRun) -> None:
    """Every model and baseline with its interval; every step with its paired interval and
    the verdict the interval allows (never a bare difference)."""
    table = (pipeline_run.ws / "reports/evaluate/comparison.md").read_text()
    headline = pipeline_run.json("metrics/evaluate.json")
    evidence = pipeline_run.json("reports/evaluate/evidence.json")
    flagged = set(evidence["not_better_than_majority"])
    for row in MODELS:
        m = headline[row.name]
        assert m["accuracy_low"] <= m["accuracy"] <= m["accuracy_high"], row.name
        label = row.name + (" ⚠ not above majority" if row.name in flagged else "")
        assert (f"| {label} | {100 * m['accuracy']:.2f} ({100 * m['accuracy_low']:.1f}–"
                f"{100 * m['accuracy_high']:.1f}) |") in table, row.name
        if row.compared_to:
            d = headline[f"{row.name}_minus_{row.compared_to}"]
            assert d["accuracy"] == pytest.approx(m["accuracy"]
                                                  - headline[row.compared_to]["accuracy"])
            verdict = ("not distinguishable from 0" if d["accuracy_low"] <= 0 <= d["accuracy_high"]
                       else "distinguishable from 0")
            assert (f"- {row.step}: {row.name} minus {row.compared_to} = "
                    f"{100 * d['accuracy']:+.2f} accuracy points (95% CI "
                    f"{100 * d['accuracy_low']:+.2f} to {100 * d['accuracy_high']:+.2f}: "
                    f"{verdict})") in table
    for baseline in ("chance", "majority", "linear_probe"):
        assert f"| *{baseline}* (baseline) | " in table
    classes = len(pipeline_run.json("data/prepared/meta.json")["classes"])
    assert headline["chance"]["accuracy"] == pytest.approx(1 / classes)
    assert headline["linear_probe"]["accuracy"] > headline["majority"]["accuracy"]


def test_the_prefect_summary_artifact_shows_the_comparison_and_links_the_runs(
        pipeline_run: PipelineRun) -> None:
    found = pipeline_run.prefect.api("POST", "/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [pipeline_run.flow_run_id]}}})
    artifacts = {a["key"]: a for a in found}
    summary = artifacts[SUMMARY_KEY]["data"]
    assert summary.startswith("# refinery pipeline: COMPLETED")
    comparison = (pipeline_run.ws / "reports/evaluate/comparison.md").read_text().strip()
    assert "## Model comparison" in summary and comparison in summary
    parent = _parent(pipeline_run)
    experiment = parent.info.experiment_id
    assert f"{pipeline_run.mlflow.uri}/#/experiments/{experiment}/runs/{parent.info.run_id}" \
        in summary
    for stage in DVC_STAGES:  # every stage's run (executed or reused) is linked
        run_id = parent.data.tags[f"refinery.stage.{stage}"]
        state = parent.data.tags[f"refinery.stage.{stage}.state"]
        assert f"- {stage} ({state}): [{run_id}](" in summary


def test_the_mlflow_parent_holds_the_headline_and_the_registered_student(
        pipeline_run: PipelineRun) -> None:
    client = pipeline_run.mlflow.client()
    parent = _parent(pipeline_run)
    assert parent.info.status == "FINISHED"
    kids = children(client, parent.info.run_id)
    for stage in DVC_STAGES:
        if parent.data.tags[f"refinery.stage.{stage}.state"] == "executed":
            assert kids[stage].info.status == "FINISHED"
    headline = flatten(pipeline_run.json("metrics/evaluate.json"))
    assert headline and all(parent.data.metrics[k] == pytest.approx(v)
                            for k, v in headline.items())
    registry = pipeline_run.json("reports/evaluate/registry.json")
    version = client.get_model_version(registry["student_model"], registry["version"])
    # registered from the logged model of the run that made it (quantize), by evaluate
    assert version.run_id == kids["quantize"].info.run_id
    assert version.tags["mlflow_run_id"] == kids["evaluate"].info.run_id
