"""Two ``dvc exp run``s with two values of one param, against a real ``mlflow server``.

Checks: two parent runs (named after the DVC experiments); the stages the
param does not reach are reused in the second (tagged with the run that made
their outputs); ``dvc exp show --json`` and MLflow report the same metrics and
param; and a headless Chromium shows the MLflow compare view of the two
executions (the screenshot is the README's ``docs/mlflow-compare.png``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import browser
import pytest
from servers import (
    BIN,
    REPO,
    MlflowServer,
    children,
    exp_show,
    parents,
    run,
    workspace_copy,
    workspace_env,
)

from refinery import fsutil

pytestmark = pytest.mark.slow

PARAM = "prepare.label_fraction"
EXPERIMENTS = {"frac-20": 0.2, "frac-30": 0.3}
UPSTREAM = ("download", "validate")  # stages prepare.label_fraction does not reach
SCREENSHOT = REPO / "docs" / "mlflow-compare.png"


@pytest.fixture(scope="module")
def experiments(mlflow_server: MlflowServer, dvc_cache: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ws = workspace_copy(tmp_path_factory.mktemp("exp") / "ws", cache=dvc_cache)
    env = workspace_env(ws, {"MLFLOW_TRACKING_URI": mlflow_server.uri})
    for name, value in EXPERIMENTS.items():
        run([str(BIN / "dvc"), "exp", "run", "prepare", "-S", f"{PARAM}={value}", "-n", name],
            ws, env)
    client = mlflow_server.client()
    by_name = {p.data.tags.get("refinery.dvc_experiment"): p for p in parents(client)}
    return {"ws": ws, "show": exp_show(ws, env), "client": client,
            "parents": {name: by_name.get(name) for name in EXPERIMENTS}}


def test_one_parent_per_experiment_and_upstream_reused(experiments: dict[str, Any]) -> None:
    client, found = experiments["client"], experiments["parents"]
    assert all(found.values()), f"missing parent runs: {found}"
    first, second = (found[name] for name in EXPERIMENTS)
    assert first.info.run_id != second.info.run_id
    assert second.info.run_name == "exp frac-30"
    for name, parent in found.items():
        assert parent.info.status == "FINISHED"
        assert parent.data.params[PARAM] == str(EXPERIMENTS[name])
        assert parent.data.tags["refinery.launcher"] == "dvc-exp"
        assert parent.data.tags["refinery.dvc_baseline_rev"]
        assert "prepare" in children(client, parent.info.run_id)
    assert set(children(client, second.info.run_id)) == {"prepare"}
    for stage in UPSTREAM:
        assert second.data.tags[f"refinery.stage.{stage}.state"] == "reused"
        assert second.data.tags[f"refinery.stage.{stage}"] == first.data.tags[
            f"refinery.stage.{stage}"]


def test_dvc_exp_show_and_mlflow_agree(experiments: dict[str, Any]) -> None:
    client = experiments["client"]
    for name, parent in experiments["parents"].items():
        data = experiments["show"][name]
        assert data["params"]["params.yaml"]["data"]["prepare"]["label_fraction"] == EXPERIMENTS[
            name]
        child = children(client, parent.info.run_id)["prepare"]
        for stage in ("prepare", *UPSTREAM):
            entry = data["metrics"].get(f"metrics/{stage}.json", {})
            assert "data" in entry, (
                f"dvc exp show has no metrics/{stage}.json for {name}: {entry.get('error')}. "
                "cache: false metrics must reach the experiment's git commit (is metrics/ "
                "in .gitignore?)")
            numbers = {k: v for k, v in entry["data"].items() if isinstance(v, int | float)}
            assert numbers, f"dvc exp show has no numeric metrics for {stage} of {name}"
            for key, value in numbers.items():
                assert parent.data.metrics[f"{stage}.{key}"] == pytest.approx(value), (
                    f"{name}: {stage}.{key}")
                if stage == "prepare":
                    assert child.data.metrics[key] == pytest.approx(value)
    labeled = [experiments["show"][n]["metrics"]["metrics/prepare.json"]["data"]
               .get("labeled_images") for n in EXPERIMENTS]
    assert labeled[0] != labeled[1]  # the param really changed the stage's result


@pytest.mark.skipif(not browser.available(), reason="Debian chromium not installed "
                    "(.ci/run installs it: apt-get install chromium)")
def test_mlflow_compare_view_screenshot(experiments: dict[str, Any],
                                        mlflow_server: MlflowServer,
                                        tmp_path: Path) -> None:
    found = experiments["parents"]
    run_ids = [found[name].info.run_id for name in EXPERIMENTS]
    experiment_id = found["frac-20"].info.experiment_id
    profile = tmp_path / "chromium-profile"
    with mlflow_server.browser() as page:  # signed in as a reader of the team server
        url = page(f"compare-runs?runs={quote(json.dumps(run_ids))}"
                   f"&experiments={quote(json.dumps([experiment_id]))}")
        dom = browser.dump_dom(url, profile)
        assert "Comparing 2 Runs" in dom
        for name in EXPERIMENTS:
            assert f"exp {name}" in dom
        shot = browser.screenshot(url, tmp_path / "compare.png", profile)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    # docs/ keeps the committed image unless asked, so test runs do not dirty git
    if not SCREENSHOT.exists() or os.environ.get("REFINERY_UPDATE_DOCS") == "1":
        with fsutil.atomic_path(SCREENSHOT) as tmp:
            shutil.copyfile(shot, tmp)
