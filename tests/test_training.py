"""The training engine on the digits data: determinism, SIGKILL resume, torchrun (gloo).

Each test works in a copy of the session's shared pipeline workspace (prepared
data, policies and a fine-tuned teacher, ``tests/pipeline_run.py``) and runs
the stages through the CLI, as DVC does. What the trained models are worth
is checked on the shared run itself (``tests/test_pipeline.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_run import PipelineRun
from workspace import REPO, run_cli, write_params

from refinery import models, paths
from refinery.formats.prepared import load_prepared

pytestmark = pytest.mark.slow


def _workspace(run: PipelineRun, target: Path, settings: dict) -> Path:
    """The shared run's data and models, with these params (the repo's plus ``settings``)."""
    target.mkdir(parents=True)
    for part in ("data", "models"):
        shutil.copytree(run.ws / part, target / part)
    write_params(target, settings)
    return target


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "model.pt", weights_only=True)


def _details(root: Path, stage: str) -> dict[str, float]:
    return json.loads((root / paths.details_file(stage)).read_text())


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative L2 distance of two state dicts' weights (running statistics left out)."""
    keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    gap = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in keys) ** 0.5
    return gap / sum(float(a[k].float().pow(2).sum()) for k in keys) ** 0.5


def test_two_identical_runs_give_identical_weights(pipeline_run: PipelineRun,
                                                   tmp_path: Path) -> None:
    settings = {"engine.deterministic": True, "finetune.epochs": 3,
                "model.teacher.arch": "student"}  # the engine is what is tested: a small net
    outs = []
    for name in ("a", "b"):
        root = _workspace(pipeline_run, tmp_path / name, settings)
        run_cli(root, "finetune", "--init", "scratch")
        outs.append(root)
    first, second = (_state(r / "models/scratch") for r in outs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    m1, m2 = (_details(r, "finetune_scratch") for r in outs)
    for key in ("val_acc", "val_loss", "train_loss"):
        assert m1[key] == m2[key]


#: The long, preemptible stages: pretraining with LARS state and the SSL augmentation
#: generator, and distillation (teacher forward, KD loss, unlabeled pool).
RESUMABLE = {
    "pretrain": ({"pretrain.epochs": 2, "pretrain.min_steps": 0, "pretrain.optim.optimizer": "lars",
                  "pretrain.optim.lr": 0.3, "model.teacher.arch": "student"}, ["pretrain"],
                 "models/pretrained"),
    "distill": ({"distill.epochs": 2, "distill.min_steps": 0}, ["distill"], "models/student"),
}


@pytest.mark.parametrize("stage", sorted(RESUMABLE))
def test_sigkill_then_restart_resumes_to_the_same_weights(pipeline_run: PipelineRun,
                                                          tmp_path: Path, stage: str) -> None:
    extra, args, out = RESUMABLE[stage]
    settings = {"engine.deterministic": True, "engine.checkpoint_every_steps": 3, **extra}
    reference = _workspace(pipeline_run, tmp_path / "reference", settings)
    run_cli(reference, *args)

    root = _workspace(pipeline_run, tmp_path / "killed", settings)
    shutil.rmtree(root / out)  # the killed run must write it itself
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "refinery", *args], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = root / f"checkpoints/{stage}/last.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists():
            state = torch.load(checkpoint, weights_only=True)
            if state["global_step"] >= 6:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the stage ended before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["global_step"]
    assert not (root / out / "model.pt").exists()

    run_cli(root, *args)
    resumed = _details(root, stage)
    assert resumed["resumed_at_step"] == killed_at > 0
    a, b = _state(reference / out), _state(root / out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from uninterrupted"
    metric = "knn_acc" if stage == "pretrain" else "val_acc"
    assert resumed[metric] == _details(reference, stage)[metric]
    assert not checkpoint.exists()  # cleared once the outputs are written


# -------------------------------------------------------------------------- torchrun
#
# One process against two (gloo, one thread each), same global batch. Measured on the
# 2-core CPU box (2026-11-29), the student-sized network fine-tuned from scratch for 32
# steps at lr 0.01 reaches ~0.92 val accuracy, and 1 vs 2 processes end 1.1e-7 apart in
# weights (relative L2) with identical loss and accuracy, the same gap as 1 vs 2 threads
# in one process (the order of float additions); one more SGD step moves the weights
# 0.8e-3 to 1.3e-3. The limit sits between the two, about 10x above the noise and 100x
# below a step. (ResNet-18 on 8x8 images and
# SimCLR are chaotic at any learning rate that learns: 1 vs 2 *threads* in one process
# end 2.6% apart after 12 fine-tuning steps at lr 0.01, 0.4% after 10 SimCLR steps at lr
# 0.005, so they cannot be compared this tightly after learning; see the SimCLR check.)
# Both in fp32 (engine.amp: off): the limits were measured there, and on a CPU with bf16
# instructions auto would add bf16's rounding, which is not what these tests are about.
FINETUNE_DDP = {"engine.deterministic": True, "engine.checkpoint_every_steps": 0,
                "engine.amp": "off",
                "model.teacher.arch": "student", "finetune.epochs": 8,
                "finetune.optim.lr": 0.01, "finetune.optim.schedule": "constant",
                "finetune.optim.warmup_epochs": 0}
WEIGHT_LIMIT = 1e-6
#: SimCLR over 10 steps at lr 1e-3: 1 vs 2 processes measured 7e-5 in weights and 4e-6
#: relative in the loss (1 vs 2 threads: 9e-5); giving both ranks the same half-batch
#: (a sharding bug) moved the loss by 2% (5.65 vs 5.55).
PRETRAIN_DDP = {"engine.deterministic": True, "engine.checkpoint_every_steps": 0,
                "engine.amp": "off",
                "model.teacher.arch": "student", "pretrain.epochs": 1,
                "pretrain.min_steps": 0, "pretrain.optim.lr": 1e-3}


def _one_process_and_two(run: PipelineRun, tmp_path: Path, settings: dict,
                         args: list[str]) -> tuple[Path, Path]:
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun not installed beside this python")
    one_thread = {"OMP_NUM_THREADS": "1"}
    single = _workspace(run, tmp_path / "single", settings)
    run_cli(single, *args, env=one_thread)
    multi = _workspace(run, tmp_path / "multi", settings)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **one_thread}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--standalone",
         "-m", "refinery", *args], cwd=multi, env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return single, multi


def _one_more_step(model_dir: Path, prepared: Path, lr: float) -> dict[str, torch.Tensor]:
    """The model one plain SGD step further, on a labeled batch: the negative control."""
    model = models.load_model(model_dir).train()
    data = load_prepared(prepared, splits=("train",))
    rows = data.labeled[:32]
    images, labels = data.train.images[rows].float() / 255, data.train.labels[rows]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_torchrun_two_processes_match_one_on_a_run_that_learns(pipeline_run: PipelineRun,
                                                               tmp_path: Path) -> None:
    single, multi = _one_process_and_two(pipeline_run, tmp_path, FINETUNE_DDP,
                                         ["finetune", "--init", "scratch"])
    one, two = _details(single, "finetune_scratch"), _details(multi, "finetune_scratch")
    assert one["val_acc"] > 0.5 and one["steps"] == 32  # it learned (chance: 0.1)
    assert two["val_acc"] == one["val_acc"]
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    a, b = _state(single / "models/scratch"), _state(multi / "models/scratch")
    assert _gap(a, b) < WEIGHT_LIMIT, f"weights drifted by {_gap(a, b):.2e} relative"
    # The same comparison cannot mistake a run one optimizer step apart for a match.
    stepped = _one_more_step(single / "models/scratch", single / "data/prepared",
                             FINETUNE_DDP["finetune.optim.lr"])
    assert _gap(a, stepped) > 100 * WEIGHT_LIMIT


def test_torchrun_simclr_matches_one_process(pipeline_run: PipelineRun,
                                             tmp_path: Path) -> None:
    single, multi = _one_process_and_two(pipeline_run, tmp_path, PRETRAIN_DDP, ["pretrain"])
    one, two = _details(single, "pretrain"), _details(multi, "pretrain")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)  # noise 4e-6, a bug 2e-2
    assert two["knn_acc"] == pytest.approx(one["knn_acc"], abs=0.02)
    gap = _gap(_state(single / "models/pretrained"), _state(multi / "models/pretrained"))
    assert gap < 1e-3, f"weights drifted by {gap:.2e} relative"  # measured 7e-5
