"""Fast checks of the flow's helpers: param overrides on params.yaml, and the stage
error the flow raises (no server, no DVC run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from servers import REPO

from pipelines import params_override
from pipelines.dvc_runner import error_message
from refinery.params import ParamsError


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_overrides_apply_keep_comments_and_restore(workspace: Path) -> None:
    original = (workspace / "params.yaml").read_text()
    overrides = {"prepare.label_fraction": 0.25, "tracking.on_unreachable": "defer"}
    with params_override.overridden(workspace, overrides) as params:
        edited = (workspace / "params.yaml").read_text()
        assert params.prepare.label_fraction == 0.25
        assert yaml.safe_load(edited)["prepare"]["label_fraction"] == 0.25
        assert yaml.safe_load(edited)["tracking"]["on_unreachable"] == "defer"
        assert "# Every knob of the pipeline" in edited  # comments survive, as with dvc -S
        assert (workspace / params_override.RECORD).exists()
    assert (workspace / "params.yaml").read_text() == original
    assert not (workspace / params_override.RECORD).exists()


def test_bad_override_is_rejected_before_the_file_is_touched(workspace: Path) -> None:
    original = (workspace / "params.yaml").read_bytes()
    with pytest.raises(ParamsError, match=r"prepare\.label_fraction"), \
            params_override.overridden(workspace, {"prepare.label_fraction": 2}):
        pass
    with pytest.raises(ParamsError, match="unknown key"), \
            params_override.overridden(workspace, {"prepare.nope": 1}):
        pass
    assert (workspace / "params.yaml").read_bytes() == original


def test_restored_even_when_the_run_fails(workspace: Path) -> None:
    original = (workspace / "params.yaml").read_bytes()
    with pytest.raises(RuntimeError), \
            params_override.overridden(workspace, {"seed": 3}):
        raise RuntimeError("stage failed")
    assert (workspace / "params.yaml").read_bytes() == original


def test_a_killed_run_is_undone_by_the_next(workspace: Path) -> None:
    original = (workspace / "params.yaml").read_text()
    runner = params_override.overridden(workspace, {"seed": 5})
    runner.__enter__()  # the process dies here: no __exit__
    assert "seed: 5" in (workspace / "params.yaml").read_text()
    record = json.loads((workspace / params_override.RECORD).read_text())
    assert record["original"] == original
    with params_override.overridden(workspace, {}) as params:
        assert params.seed == 0
    assert (workspace / "params.yaml").read_text() == original


def test_user_edit_during_the_run_is_kept(workspace: Path) -> None:
    with params_override.overridden(workspace, {"seed": 5}):
        (workspace / "params.yaml").write_text("seed: 9\n")
    assert (workspace / "params.yaml").read_text() == "seed: 9\n"


@pytest.mark.parametrize(("lines", "expected", "params_error"), [
    (["Running stage 'download':", "> python -m refinery download",
      "refinery download: file:///x.tar: local source /x.tar does not exist",
      "ERROR: failed to reproduce 'download': failed to run: python -m refinery download, "
      "exited with 1"],
     "refinery download: file:///x.tar: local source /x.tar does not exist", False),
    (["refinery: params.yaml is invalid:", "  prepare.label_fraction: too big (got 2)",
      "ERROR: failed to reproduce 'prepare'"],
     "refinery: params.yaml is invalid:\n  prepare.label_fraction: too big (got 2)", True),
    (["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: boom",
      "ERROR: failed to reproduce 'pretrain'"], "ValueError: boom", False),
    (["ERROR: './dvc.yaml' validation failed."], "'./dvc.yaml' validation failed.", False),
    (["refinery finetune: these params cannot work on the prepared data (219 train images):",
      "  finetune: 1 training samples cannot fill 2 images per process",
      "ERROR: failed to reproduce 'finetune': failed to run: python -m refinery finetune "
      "--init pretrained, exited with 2"],
     "refinery finetune: these params cannot work on the prepared data (219 train images):\n"
     "  finetune: 1 training samples cannot fill 2 images per process", True),
])
def test_stage_error_is_the_stage_own_message(lines: list[str], expected: str,
                                              params_error: bool) -> None:
    assert error_message(lines, 1) == (expected, params_error)
