"""The team servers as ``mlflow/README.md`` sets them up, really started: nobody in who
does not belong.

The session run's MLflow server (``servers.start_team_mlflow``) is the documented team
server: ``mlflow/server.sh`` with PostgreSQL for runs and the registry, a
second PostgreSQL database for users, MLflow's basic-auth app (admin password
from a file, READ by default), artifacts proxied to a folder. The whole digits
pipeline of the session (``tests/pipeline_run.py``) ran against it signed in
as the pipeline's user; here a second client process, signed in as a reader,
reads back what it logged, and cannot move the ``champion`` alias; a client
without credentials gets nothing. The Prefect server is protected by its auth
string the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
from pipeline_run import PipelineRun
from servers import PIPELINE_USER, REPO, VIEWER, PrefectServer, tool_env

from refinery import lineage
from refinery.pipeline import MODELS, STAGES

pytestmark = pytest.mark.slow

READER = textwrap.dedent("""
    import json, sys
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, pipeline_id = sys.argv[1], sys.argv[2]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("refinery")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   f"tags.`refinery.pipeline_id` = '{pipeline_id}' "
                                   "and tags.`refinery.role` = 'pipeline'")
    stages = client.search_runs([experiment.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    models = client.search_logged_models([experiment.experiment_id])
    champion = client.get_model_version_by_alias(name, "champion")
    out = {
        "parent": parent.info.run_id,
        "stages": {r.data.tags["refinery.stage"]: sorted(
            (i.dataset.name, i.dataset.digest) for i in r.inputs.dataset_inputs) for r in stages},
        "models": {m.model_id: {"name": m.name,
                                "metrics": [[x.key, x.value, x.run_id] for x in m.metrics or []]}
                   for m in models},
        "champion": [champion.version, champion.source],
    }
    try:
        client.set_registered_model_alias(name, "champion", "1")
        out["moved"] = True
    except MlflowException as exc:
        out["moved"] = False
        out["refused"] = exc.error_code
    print("READ " + json.dumps(out))
""")


def _reader(pipeline_run: PipelineRun, user: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in tool_env().items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_TRACKING_URI"] = pipeline_run.mlflow.uri
    auth = pipeline_run.mlflow.auth
    assert auth is not None
    if user is not None:
        env.update(auth.client_env(user))
    name = pipeline_run.json("reports/evaluate/registry.json")["student_model"]
    return subprocess.run([sys.executable, "-c", READER, name, pipeline_run.result["pipeline_id"]],
                          capture_output=True, text=True, timeout=300, env=env)


def test_the_pipeline_logged_into_postgresql(pipeline_run: PipelineRun) -> None:
    database = pipeline_run.mlflow.database
    assert database is not None  # the session server is the PostgreSQL one
    for stage in STAGES:
        record = lineage.read(stage.name, pipeline_run.ws)
        assert record is not None and record.run_id
        status = database.sql(f"SELECT status FROM runs WHERE run_uuid = '{record.run_id}'",
                              "mlflow")
        assert status == "FINISHED", stage.name
        user = database.sql("SELECT value FROM tags WHERE key = 'mlflow.user' AND "
                            f"run_uuid = '{record.run_id}'", "mlflow")
        assert user == PIPELINE_USER, stage.name  # the signed-in user, from MLflow's own tags
    logged = int(database.sql("SELECT count(*) FROM logged_models", "mlflow"))
    assert logged >= len(MODELS)
    aliases = database.sql("SELECT alias FROM registered_model_aliases", "mlflow").split()
    assert {"champion", "candidate"} <= set(aliases)
    users = database.sql("SELECT username FROM users ORDER BY username", "mlflow_auth").split()
    assert users == ["admin", "pipeline", "viewer"]


def test_a_reader_in_another_process_sees_everything_and_moves_nothing(
        pipeline_run: PipelineRun) -> None:
    client = pipeline_run.mlflow.client()
    name = pipeline_run.json("reports/evaluate/registry.json")["student_model"]
    before = client.get_model_version_by_alias(name, "champion")
    result = _reader(pipeline_run, VIEWER)
    assert result.returncode == 0, result.stderr[-4000:]
    read = json.loads(result.stdout.split("READ ", 1)[1])
    assert read["moved"] is False and read["refused"] == "PERMISSION_DENIED"
    assert client.get_model_version_by_alias(name, "champion").version == before.version
    assert read["champion"] == [before.version, before.source]
    assert set(read["stages"]) == {stage.name for stage in STAGES}  # every stage executed
    described = pipeline_run.json("data/prepared/meta.json")["datasets"]
    assert sorted(digest for _, digest in read["stages"]["evaluate"]) == sorted(
        (described["labeled"]["digest"], described["test"]["digest"]))
    names = {m["name"] for m in read["models"].values()}
    assert {row.name for row in MODELS} <= names
    champion_model = read["models"][before.source.removeprefix("models:/")]
    evaluation = lineage.read("evaluate", pipeline_run.ws)
    assert evaluation is not None
    # other tests score the same model again (e.g. on a changed test split): take the
    # value the session's evaluate run logged
    (accuracy,) = [value for key, value, run_id in champion_model["metrics"]
                   if key == "accuracy" and run_id == evaluation.run_id]
    assert accuracy == pytest.approx(
        pipeline_run.json("reports/evaluate/details.json")[champion_model["name"]]["accuracy"])


def test_a_client_without_credentials_is_refused(pipeline_run: PipelineRun) -> None:
    response = requests.get(f"{pipeline_run.mlflow.uri}/api/2.0/mlflow/experiments/get-by-name",
                            params={"experiment_name": "refinery"}, timeout=30)
    assert response.status_code == 401
    result = _reader(pipeline_run, None)
    assert result.returncode != 0 and "401" in result.stderr


def test_the_prefect_server_wants_its_auth_string(prefect_server: PrefectServer) -> None:
    url = f"{prefect_server.api_url}/flows/filter"
    assert requests.post(url, json={}, timeout=30).status_code == 401
    assert requests.post(url, json={}, timeout=30, auth=("refinery", "wrong")).status_code == 401
    signed = requests.post(url, json={}, timeout=30, auth=tuple(PrefectServer.AUTH.split(":", 1)))
    assert signed.status_code == 200


@pytest.mark.parametrize(("settings", "refusal"), [
    ({"MLFLOW_AUTH": "none", "MLFLOW_HOST": "0.0.0.0"}, "only allowed on loopback"),
    ({"MLFLOW_AUTH_DATABASE_URI": "sqlite:///auth.db"}, "MLFLOW_AUTH_ADMIN_PASSWORD_FILE"),
    ({"MLFLOW_AUTH_DATABASE_URI": "sqlite:///auth.db",
      "MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, "well-known admin password"),
    ({}, "MLFLOW_AUTH_DATABASE_URI"),
])
def test_the_server_script_refuses_to_start_unprotected(settings: dict[str, str], refusal: str,
                                                        tmp_path: Path) -> None:
    env = {k: v for k, v in tool_env().items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'db'}",
                "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"), **settings})
    result = subprocess.run(["bash", str(REPO / "mlflow" / "server.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert refusal in result.stderr
    assert not os.path.exists(tmp_path / "db")  # refused before anything was created
