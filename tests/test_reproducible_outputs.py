"""Two runs from scratch of the same commit, params and machine give byte-identical outputs.

Bit-identical weights are not enough: DVC hashes files, so a model file whose
bytes differ (a temporary name inside the zip, a timing in its config) is a
new output to DVC, every stage after it reruns, and the run-cache never hits.
The session's shared run (the Prefect flow, every stage through ``dvc repro``)
against a copy of its workspace, with a DVC cache of its own, that computes
the data stages and a training stage again from scratch (``dvc repro
--force``): every ``data/`` and ``models/`` output they write must have the
md5 the shared run recorded in its ``dvc.lock``.

What legitimately differs between such runs (and is not compared here):
``lineage/<stage>.json`` (run ids, finish time), the ``metrics/*.json`` and
``plots/*.csv`` figures that are timings (seconds, images per second), and the
stage reports that carry them (``reports/<stage>/``, Data Docs timestamps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pipeline_run import PipelineRun
from servers import BIN, run, workspace_env

pytestmark = pytest.mark.slow


def _outs(ws: Path) -> dict[str, str]:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    found: dict[str, str] = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"].startswith(("data/", "models/")):
                found[out["path"]] = out["md5"]
    return found


AGAIN = ("download", "validate", "prepare", "augment", "finetune_scratch")


def test_two_fresh_runs_write_the_same_bytes(pipeline_run: PipelineRun, tmp_path: Path) -> None:
    ws = pipeline_run.copy_of(tmp_path / "ws")
    run([str(BIN / "dvc"), "cache", "dir", "--local", str(tmp_path / "cache")], ws)
    env = workspace_env(ws, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/ml.db"})
    for stage in AGAIN:
        out = run([str(BIN / "dvc"), "repro", "--force", "--single-item", stage], ws, env).stdout
        assert f"Running stage '{stage}'" in out  # computed again, not restored
    first, second = _outs(pipeline_run.ws), _outs(ws)
    again = {path for path in second if path.startswith(("data/", "models/scratch"))}
    assert {"data/raw", "data/prepared", "data/augment", "models/scratch"} <= again
    differing = {path: (first[path], second[path]) for path in again
                 if first[path] != second[path]}
    assert differing == {}, f"outputs whose bytes differ between identical runs: {differing}"
