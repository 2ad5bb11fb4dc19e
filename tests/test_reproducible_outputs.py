"""Two runs from scratch of the same commit, params and machine give byte-identical outputs.

Bit-identical weights are not enough: DVC hashes files, so a model file whose
bytes differ (a temporary name inside the zip, a timing in its config) is a
new output to DVC, every stage after it reruns, and the run-cache never hits.
Two fresh workspaces, each with its own DVC cache, run the pipeline up to
``quantize``; every ``data/`` and ``models/`` output in their ``dvc.lock`` must
have the same md5.

What legitimately differs between such runs (and is not compared here):
``lineage/<stage>.json`` (run ids, finish time), the ``metrics/*.json`` and
``plots/*.csv`` figures that are timings (seconds, images per second), and the
stage reports that carry them (``reports/<stage>/``, Data Docs timestamps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from servers import BIN, run, workspace_copy, workspace_env
from workspace import TINY_TRAINING

pytestmark = pytest.mark.slow

SETTINGS = {**TINY_TRAINING, "pretrain.epochs": 1, "finetune.epochs": 2, "distill.epochs": 1,
            "quantize.calibration_images": 128}


def _outs(ws: Path) -> dict[str, str]:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    found: dict[str, str] = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"].startswith(("data/", "models/")):
                found[out["path"]] = out["md5"]
    return found


def test_two_fresh_runs_write_the_same_bytes(tmp_path: Path) -> None:
    outs = []
    for name in ("first", "second"):
        ws = workspace_copy(tmp_path / name / "ws", cache=tmp_path / name / "cache",
                            overrides=SETTINGS)
        run([str(BIN / "dvc"), "repro", "quantize"], ws,
            workspace_env(ws, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / name}/ml.db"}))
        outs.append(_outs(ws))
    first, second = outs
    assert {"data/prepared", "models/teacher", "models/student-int8"} <= set(first)
    differing = {path: (first[path], second.get(path)) for path in first
                 if first[path] != second.get(path)}
    assert differing == {}, f"outputs whose bytes differ between identical runs: {differing}"
