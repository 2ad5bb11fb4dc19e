"""What a person sees in the MLflow UI after a pipeline run, asserted through the client.

The screenshots in docs/ (``benchmarks/mlflow_screens.py``) show the training
view with the Datasets column filled, a model's page with its test metrics,
and the compare view. Here the same facts are read back from the real
tracking server of the session's pipeline run (``tests/pipeline_run.py``): the
experiment is a model-training one, every run names the data sets it read
(one digest per split, whichever stage logged it), every trained model is a
logged model of the run that made it with its test metrics on the test data
set, the registry's versions come from those models, and training runs carry
system metrics.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import browser
import pytest
from mlflow.entities import LoggedModelStatus
from pipeline_run import PipelineRun
from servers import REPO

from refinery import fsutil, lineage
from refinery.pipeline import MODELS, STAGES, int8_row, model_row
from refinery.tracking import run_url

pytestmark = pytest.mark.slow


def _stage_run(pipeline_run: PipelineRun, stage: str) -> Any:
    record = lineage.read(stage, pipeline_run.ws)
    assert record is not None and record.run_id, stage
    return pipeline_run.mlflow.client().get_run(record.run_id)


def _inputs(run: Any) -> dict[tuple[str, str], str]:
    """(data set name, context) -> digest of a run's dataset inputs."""
    found = {}
    for item in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in item.tags}["mlflow.data.context"]
        found[(item.dataset.name, context)] = item.dataset.digest
    return found


def test_the_experiment_opens_as_model_training(pipeline_run: PipelineRun) -> None:
    client = pipeline_run.mlflow.client()
    experiment = client.get_experiment_by_name("refinery")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    url = run_url(experiment.experiment_id, "abc", pipeline_run.mlflow.uri)
    assert url is not None and url.endswith("/runs/abc?workflowType=machine_learning")


def test_every_run_names_the_data_sets_it_read_with_one_digest_per_split(
        pipeline_run: PipelineRun) -> None:
    described = pipeline_run.json("data/prepared/meta.json")["datasets"]
    assert set(described) == {"train", "val", "labeled", "test"}
    assert described["labeled"]["profile"]["images"] == pipeline_run.json(
        "data/prepared/meta.json")["labeled"]
    assert described["train"]["source"] == "builtin:digits"
    assert sum(described["test"]["profile"]["class_counts"].values()) == \
        described["test"]["profile"]["images"]
    digests = {d["name"]: d["digest"] for d in described.values()}
    assert len(set(digests.values())) == 4  # four different data sets
    for stage in STAGES:
        logged = _inputs(_stage_run(pipeline_run, stage.name))
        expected = {(described[split]["name"], context) for split, context in stage.datasets}
        assert set(logged) == expected, stage.name
        for (name, _), digest in logged.items():  # the same split has the same digest
            assert digest == digests[name], (stage.name, name)
    # the parent (the row the runs list shows, its stages folded under it) names them all
    record = lineage.read("evaluate", pipeline_run.ws)
    assert record is not None and record.parent_run_id
    parent = pipeline_run.mlflow.client().get_run(record.parent_run_id)
    assert {name for name, _ in _inputs(parent)} == set(digests)
    # the registry's data set identity is the test split's digest
    assert pipeline_run.json("reports/evaluate/registry.json")["version"]
    client = pipeline_run.mlflow.client()
    name = pipeline_run.json("reports/evaluate/registry.json")["student_model"]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["refinery.dataset"].endswith(described["test"]["digest"])


def test_every_model_is_a_logged_model_of_its_run_with_its_test_metrics(
        pipeline_run: PipelineRun) -> None:
    client = pipeline_run.mlflow.client()
    evaluation = pipeline_run.json("reports/evaluate/details.json")
    test_set = pipeline_run.json("data/prepared/meta.json")["datasets"]["test"]
    evaluate = lineage.read("evaluate", pipeline_run.ws)
    assert evaluate is not None and evaluate.models == {}  # it had to log none itself
    for stage in STAGES:
        made = [row for row in MODELS if row.path in stage.outs]
        record = lineage.read(stage.name, pipeline_run.ws)
        assert record is not None
        assert sorted(record.models) == sorted(row.name for row in made), stage.name
        for row in made:
            model = client.get_logged_model(record.models[row.name])
            assert model.source_run_id == record.run_id and model.name == row.name
            assert model.status == LoggedModelStatus.READY
            # what the session's evaluate logged (other tests may score the model again)
            metrics = {m.key: m for m in model.metrics or [] if m.run_id == evaluate.run_id}
            for key in ("accuracy", "macro_f1", "ece", "file_mb", "latency_p50_ms"):
                assert metrics[key].value == pytest.approx(evaluation[row.name][key]), \
                    (row.name, key)
                assert metrics[key].dataset_name == test_set["name"]
                assert metrics[key].dataset_digest == test_set["digest"]
    assert len(MODELS) == 5  # scratch, teacher, student, pruned student, int8 student


def test_registered_versions_link_back_to_the_logged_models(pipeline_run: PipelineRun) -> None:
    client = pipeline_run.mlflow.client()
    registry = pipeline_run.json("reports/evaluate/registry.json")
    quantize = lineage.read("quantize", pipeline_run.ws)
    finetune = lineage.read("finetune", pipeline_run.ws)
    assert quantize is not None and finetune is not None
    # The server's answer has no model_id field; the version's source is the logged model.
    student = client.get_model_version(registry["student_model"], registry["version"])
    assert student.source == f"models:/{quantize.models[int8_row().name]}"
    assert student.run_id == quantize.run_id
    teacher = client.get_model_version(registry["teacher_model"], registry["teacher_version"])
    assert teacher.source == f"models:/{finetune.models[model_row('teacher').name]}"
    assert teacher.run_id == finetune.run_id


def test_training_runs_carry_system_metrics(pipeline_run: PipelineRun) -> None:
    for stage in STAGES:
        metrics = _stage_run(pipeline_run, stage.name).data.metrics
        system = {k for k in metrics if k.startswith("system/")}
        if stage.schedule:
            assert {"system/cpu_utilization_percentage",
                    "system/system_memory_usage_megabytes"} <= system, stage.name
        else:
            assert not system, stage.name


SCREENSHOTS = {"runs": REPO / "docs" / "mlflow-training-runs.png",
               "model": REPO / "docs" / "mlflow-model.png"}


@pytest.mark.skipif(not browser.available(), reason="Debian chromium not installed "
                    "(.ci/run installs it: apt-get install chromium)")
def test_the_ui_shows_datasets_and_model_metrics(pipeline_run: PipelineRun,
                                                 tmp_path: Path) -> None:
    """What a person sees, in headless Chromium signed in as a reader: the runs list with
    its Datasets column filled, and the int8 student's page with its test metrics. The
    images are README's (``REFINERY_UPDATE_DOCS=1 make test`` refreshes them)."""
    server = pipeline_run.mlflow
    experiment = server.client().get_experiment_by_name("refinery").experiment_id
    described = pipeline_run.json("data/prepared/meta.json")["datasets"]
    quantize = lineage.read("quantize", pipeline_run.ws)
    assert quantize is not None
    pages = {"runs": (f"experiments/{experiment}/runs",
                      [described["labeled"]["name"], "Datasets"]),
             "model": (f"experiments/{experiment}/models/{quantize.models[int8_row().name]}",
                       [int8_row().name, "accuracy", "latency_p50_ms"])}
    for key, (fragment, expected) in pages.items():
        profile = tmp_path / f"profile-{key}"
        with server.browser() as page:  # signed in as a reader
            dom = browser.dump_dom(page(fragment), profile)
            for text in expected:
                assert text in dom, (key, text)
            shot = browser.screenshot(page(fragment), tmp_path / f"{key}.png", profile)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if not SCREENSHOTS[key].exists() or os.environ.get("REFINERY_UPDATE_DOCS") == "1":
            with fsutil.atomic_path(SCREENSHOTS[key]) as tmp:
                shutil.copyfile(shot, tmp)
