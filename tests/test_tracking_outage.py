"""Kill the MLflow server in the middle of a ``dvc repro``: nothing computed is lost.

One real server process, SIGKILLed when the first stage has finished (outputs written,
run recorded on its parent):

1. ``tracking.on_unreachable: fail`` (default): the next stage refuses to
   start, with the CLI's one-line error; the finished stage is in
   ``dvc.lock`` and its outputs stay.
2. ``defer``, server still down: the same ``dvc repro`` completes, the
   finished stage is not recomputed, the new runs go to the spool.
3. Server restarted: ``refinery sync-tracking`` replays the spool, and the
   MLflow tree is whole (one download run, ever; the second execution's
   parent with its children and metrics).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from servers import (
    BIN,
    MlflowServer,
    children,
    parents,
    run,
    runs,
    wait_for,
    workspace_copy,
    workspace_env,
)

from refinery import lineage

pytestmark = pytest.mark.slow


def _set_on_unreachable(workspace: Path, mode: str) -> None:
    """``tracking`` is read by no DVC stage, so this edit makes nothing stale."""
    path = workspace / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw.setdefault("tracking", {})["on_unreachable"] = mode
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_server_killed_mid_pipeline(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        ws = workspace_copy(tmp_path / "ws")
        env = workspace_env(ws, {"MLFLOW_TRACKING_URI": server.uri})
        dvc = str(BIN / "dvc")

        # 1. fail fast: the server dies once download has finished
        proc = subprocess.Popen([dvc, "repro", "prepare"], cwd=ws, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        client = server.client()
        # finished = its outputs written *and* recorded on the parent (the last thing a stage
        # does; a server lost in between would cost that record, as mlflow/README.md says)
        wait_for(lambda: proc.poll() is not None or runs(
            client, query="tags.`refinery.stage.download.state` = 'executed'"),
            600, "the download stage to finish and be recorded")
        server.kill()
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode != 0, output
        assert f"refinery validate: MLflow tracking server {server.uri} is unreachable" in output
        assert "stage 'validate' did not start" in output
        assert "Traceback" not in output
        locked = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
        assert "download" in locked and "validate" not in locked
        assert (ws / "data" / "raw").is_dir() and not (ws / "data" / "manifest.parquet").exists()
        download = lineage.read("download", ws)
        assert download is not None and download.run_id

        # 2. defer: the same command completes while the server is still down
        _set_on_unreachable(ws, "defer")
        second = run([dvc, "repro", "prepare"], ws, env)
        assert "Stage 'download' didn't change, skipping" in second.stdout
        for stage in ("validate", "prepare"):
            record = lineage.read(stage, ws)
            assert record is not None and record.deferred and record.run_id is None
        assert json.loads((ws / "metrics" / "prepare.json").read_text())

        # 3. the server is back: replay, then the rerun has nothing left to do
        server.start()
        synced = run([str(BIN / "python"), "-m", "refinery", "sync-tracking"], ws, env)
        assert "run(s) replayed" in synced.stdout
        assert "Data and pipelines are up to date" in run([dvc, "repro", "prepare"], ws,
                                                          env).stdout

        client = server.client()
        download_runs = runs(client, query="tags.`refinery.stage` = 'download'")
        assert [r.info.run_id for r in download_runs] == [download.run_id]  # never recomputed
        prepare = lineage.read("prepare", ws)
        assert prepare is not None
        (parent,) = [p for p in parents(client)
                     if p.data.tags["refinery.pipeline_id"] == prepare.pipeline_id]
        kids = children(client, parent.info.run_id)
        assert set(kids) == {"validate", "prepare"}
        assert all(k.info.status == "FINISHED" for k in kids.values())
        assert parent.data.tags["refinery.stage.download"] == download.run_id
        for stage in ("validate", "prepare"):  # written offline as spool ids, resolved at replay
            assert parent.data.tags[f"refinery.stage.{stage}"] == kids[stage].info.run_id
        assert parent.data.tags["refinery.stage.download.state"] == "reused"
        expected = json.loads((ws / "metrics" / "prepare.json").read_text())
        for key, value in expected.items():
            if isinstance(value, int | float):
                assert kids["prepare"].data.metrics[key] == pytest.approx(value)
                assert parent.data.metrics[f"prepare.{key}"] == pytest.approx(value)
        assert client.list_artifacts(kids["validate"].info.run_id, "validation")
        (first,) = [p for p in parents(client)
                    if p.data.tags["refinery.pipeline_id"] == download.pipeline_id]
        assert first.data.tags["refinery.stage.download.state"] == "executed"
    finally:
        server.stop()
