"""Test workspaces hold what git tracks, never the run state of the user's checkout.

``make pipeline`` then ``make test`` (README's order) once failed: the copy
took the checkout's untracked ``dvc.lock`` and ``metrics/`` along, and a test
that expects a fresh workspace saw stages it had not run. It failed again in CI
once the copy read git's index: DVC's ``core.autostage`` stages ``dvc.lock`` and
the ``cache: false`` metrics after ``dvc repro``.
"""

from __future__ import annotations

from pathlib import Path

from servers import run, workspace_copy


def test_the_copy_has_tracked_files_with_their_edits_and_no_run_state(tmp_path: Path) -> None:
    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / "params.yaml").write_text("seed: 0\n")
    (repo / ".gitignore").write_text("/models/\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  validate:\n    cmd: python -m refinery validate\n"
        "    outs:\n    - models/\n"
        "    metrics:\n    - metrics/validate.json:\n        cache: false\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    run(["git", "init", "-q"], repo)
    run([*git, "add", "-A"], repo)
    run([*git, "commit", "-q", "-m", "x"], repo)
    (repo / "params.yaml").write_text("seed: 1\n")  # a working change to a tracked file
    (repo / "dvc.lock").write_text("stages: {}\n")  # what make pipeline leaves
    (repo / "metrics").mkdir()
    (repo / "metrics" / "validate.json").write_text("{}\n")
    (repo / "models").mkdir()
    (repo / "models" / "model.pt").write_bytes(b"x")
    run([*git, "add", "dvc.lock", "metrics/validate.json"], repo)  # what core.autostage does
    copy = workspace_copy(tmp_path / "copy", source=repo)
    assert (copy / "params.yaml").read_text() == "seed: 1\n"
    assert (copy / "dvc.yaml").exists()
    assert not (copy / "dvc.lock").exists()
    assert not (copy / "metrics").exists() and not (copy / "models").exists()
