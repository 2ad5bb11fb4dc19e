"""Two clones share a DVC remote: the second gets every stage from the first's run.

The first clone is (a copy of) the session's pipeline run
(``tests/pipeline_run.py``: the whole digits pipeline through the Prefect
flow, each stage by ``dvc repro``). As README says, it commits ``dvc.lock``
(and the small uncached outputs: metrics, plots) to git and pushes the data
and DVC's run-cache to the shared remote (a local directory here; README's "A
DVC remote for data and models" has the S3 one). A second clone of that
commit, with an empty cache, runs ``dvc pull --run-cache`` and ``dvc repro``:
nothing runs, every output is the first clone's, and the lineage files still
name the MLflow runs that made them, which the tracking server still has.

Why not a clone without ``dvc.lock``, restored from the run-cache alone: DVC
3.67 pushes no object of a ``cache: false`` output (every stage's
``metrics/<stage>.json``) with ``--run-cache``, so the second clone could not
restore any stage that way; committing ``dvc.lock`` is the documented team
workflow anyway.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from pipeline_run import PipelineRun
from servers import BIN, run

from refinery import lineage
from refinery.pipeline import STAGES

pytestmark = pytest.mark.slow


def test_a_second_clone_restores_every_stage_from_the_shared_remote(
        pipeline_run: PipelineRun, tmp_path: Path) -> None:
    dvc, env = str(BIN / "dvc"), pipeline_run.env
    remote = tmp_path / "shared-remote"
    first = pipeline_run.copy_of(tmp_path / "first")
    git = ["git", "-c", "user.name=refinery-tests", "-c", "user.email=tests@refinery.invalid"]
    run([*git, "add", "-A"], first, env)
    run([*git, "commit", "-q", "-m", "pipeline run: dvc.lock, metrics, plots"], first, env)
    run([dvc, "remote", "add", "--local", "--force", "-d", "shared", str(remote)], first, env)
    run([dvc, "push", "--run-cache"], first, env)

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path, env)
    assert (second / "dvc.lock").exists() and not (second / "models").exists()
    run([dvc, "remote", "add", "--local", "-d", "shared", str(remote)], second, env)
    run([dvc, "pull", "--run-cache"], second, env)
    # no MLflow server in this environment: a stage that ran would fail to start
    offline = {**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    repro = run([dvc, "repro"], second, offline).stdout
    assert "Running stage" not in repro, repro[-3000:]
    for stage in STAGES:
        assert f"Stage '{stage.name}' didn't change, skipping" in repro, (stage.name, repro)

    client = pipeline_run.mlflow.client()
    for stage in STAGES:
        ours, theirs = lineage.read(stage.name, second), lineage.read(stage.name, first)
        assert ours is not None and ours == theirs, stage.name
        assert ours.run_id is not None
        assert client.get_run(ours.run_id).data.tags["refinery.stage"] == stage.name
        for out in stage.outs:  # the very bytes the first clone made
            mismatch = _differences(first / out, second / out)
            assert not mismatch, (stage.name, out, mismatch)
    status = run([dvc, "status"], second, offline).stdout
    assert "up to date" in status, status


def _differences(a: Path, b: Path) -> list[str]:
    if a.is_file():
        return [] if filecmp.cmp(a, b, shallow=False) else [str(a)]
    compared = filecmp.dircmp(a, b)
    found = [*compared.left_only, *compared.right_only, *compared.diff_files]
    for name in compared.common_dirs:
        found += _differences(a / name, b / name)
    return found
