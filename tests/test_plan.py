"""The schedule rule and the whole-plan check: infeasible settings fail before the work.

Unit tests pin the rule (batch capped by the data, learning rate rescaled with
it, a floor in steps, a warning under 100 steps, errors naming the key). The
CLI tests run the real stages on the digits default: ``prepare`` refuses a
plan that cannot run before it writes anything, a training stage refuses one
(its own or a later stage's) before it trains, each as one line on stderr with
exit code 2, and ``check-params`` shows the resolved plan.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from pipeline_run import PipelineRun
from workspace import REPO, run_cli, write_params

from refinery.engine.schedule import FEW_STEPS, resolve
from refinery.errors import ParamsError
from refinery.params import OptimParams, Params, apply_overrides, parse_params
from refinery.plan import check_plan

SGD = OptimParams(optimizer="sgd", lr=0.4)


def test_a_batch_that_fits_is_kept() -> None:
    s = resolve("pretrain", 1293, batch_size=128, epochs=8, optim=SGD)
    assert (s.batch, s.steps_per_epoch, s.epochs, s.total_steps) == (128, 10, 8, 80)
    assert s.optim.lr == 0.4 and s.notes == ()
    assert s.warnings and "only 80 optimizer steps" in s.warnings[0]


def test_the_batch_is_capped_by_the_data_and_the_lr_follows_it() -> None:
    s = resolve("pretrain", 219, batch_size=128, epochs=8, optim=SGD)
    assert s.batch == 54 and s.steps_per_epoch == 4  # 219 // 4
    assert s.optim.lr == pytest.approx(0.4 * 54 / 128)  # linear for SGD
    adamw = resolve("pretrain", 219, batch_size=128, epochs=8,
                    optim=OptimParams(optimizer="adamw", lr=0.4))
    assert adamw.optim.lr == pytest.approx(0.4 * math.sqrt(54 / 128))
    lars = resolve("pretrain", 219, batch_size=128, epochs=8,
                   optim=OptimParams(optimizer="lars", lr=0.4))
    assert lars.optim.lr == pytest.approx(0.4 * 54 / 128)
    assert any("pretrain.batch_size 128" in n for n in s.notes)
    assert any("pretrain.optim.lr 0.4 rescaled (linear)" in n for n in s.notes)


def test_the_cap_keeps_whole_micro_batches_per_process() -> None:
    s = resolve("distill", 219, batch_size=128, epochs=1, optim=SGD, accumulate=2,
                world_size=4)
    assert s.batch == 48 and s.local_batch == 6  # 54 rounded down to a multiple of 8


def test_min_steps_raises_the_epochs() -> None:
    s = resolve("pretrain", 219, batch_size=128, epochs=8, optim=SGD, min_steps=500)
    assert s.epochs == 125 and s.total_steps == 500 and s.warnings == ()
    assert any("pretrain.min_steps 500" in n for n in s.notes)


def test_what_no_rule_can_fix_names_the_key() -> None:
    with pytest.raises(ParamsError, match=r"finetune: 3 training samples .*finetune.accumulate"
                                          r".*raise prepare.label_fraction"):
        resolve("finetune", 3, batch_size=32, epochs=1, optim=SGD, accumulate=2)
    with pytest.raises(ParamsError, match=r"pretrain.batch_size \(100\) must be a multiple of "
                                          r"pretrain.accumulate x processes \(3 x 1\); e.g. 99"):
        resolve("pretrain", 1000, batch_size=100, epochs=1, optim=SGD, accumulate=3)


def _meta(train: int, labeled: int, side: int = 8, channels: int = 1) -> dict:
    return {"counts": {"train": train, "val": 20, "test": 50}, "labeled": labeled,
            "size": side, "channels": channels, "classes": ["a", "b"],
            "mean": [0.5] * channels, "std": [0.25] * channels}


def repo_params(overrides: dict) -> Params:
    return parse_params(apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()),
                                        overrides))


def test_the_plan_of_a_small_photo_set_adapts_and_says_so() -> None:
    params = repo_params({"images.side": 64, "images.channels": 3})
    plan = check_plan(params, _meta(219, 22, side=64, channels=3))
    assert plan.schedules["pretrain"].batch == 54
    assert plan.schedules["finetune"].batch == 5  # 22 labeled // 4
    assert plan.schedules["finetune"].total_steps == 4 * params.finetune.epochs
    # the default step floors lift pretraining (8 epochs = 32 steps), distillation (80) and
    # pruning's recovery (40) to a working length; nothing is left under FEW_STEPS
    assert plan.schedules["pretrain"].total_steps >= params.pretrain.min_steps >= FEW_STEPS
    assert plan.schedules["distill"].total_steps >= FEW_STEPS
    assert plan.schedules["prune"].total_steps >= FEW_STEPS
    assert plan.warnings == []
    short = check_plan(repo_params({"images.side": 64, "images.channels": 3,
                                    "pretrain.min_steps": 0, "distill.min_steps": 0,
                                    "prune.min_steps": 0}), _meta(219, 22, side=64, channels=3))
    # without the floors, each says so, and how to fix it
    assert [w.split(" runs only")[0] for w in short.warnings] == ["pretrain", "distill", "prune"]
    assert f"set pretrain.min_steps: {FEW_STEPS} (or pretrain.epochs: 25)" in short.warnings[0]


def test_every_problem_of_the_plan_is_reported_at_once() -> None:
    params = parse_params({"finetune": {"accumulate": 8, "batch_size": 32, "mode": "linear"},
                           "augment": {"supervised": {"translate_px": 8}}})
    with pytest.raises(ParamsError) as info:
        check_plan(params, _meta(1293, 13))
    text = str(info.value)
    assert "1293 train images, 13 labeled" in text
    assert "finetune: 13 training samples cannot fill 2 images per process x " \
           "finetune.accumulate 8" in text
    assert "augment.supervised.translate_px: a 8 px shift is not smaller than the 8 px" in text
    assert "finetune.mode: linear" in text


# ------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def prepared(pipeline_run: PipelineRun) -> Path:
    return pipeline_run.ws  # read only: each test copies its data


def _copy(prepared: Path, target: Path, overrides: dict) -> Path:
    shutil.copytree(prepared / "data", target / "data")
    write_params(target, overrides)
    return target


@pytest.mark.slow
def test_a_stage_refuses_a_later_stage_infeasible_params_before_training(
        prepared: Path, tmp_path: Path) -> None:
    ws = _copy(prepared, tmp_path, {"distill.accumulate": 1024, "distill.batch_size": 1024})
    result = run_cli(ws, "pretrain", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("refinery ")]
    assert lines and lines[0].startswith("refinery pretrain: these params cannot work")
    assert "distill: 1293 training samples cannot fill 2 images per process x " \
           "distill.accumulate 1024" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (ws / "models").exists() and not (ws / "checkpoints").exists()
    debug = run_cli(ws, "--debug", "pretrain", check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_prepare_refuses_an_infeasible_plan_before_writing(prepared: Path,
                                                          tmp_path: Path) -> None:
    ws = _copy(prepared, tmp_path, {"augment.supervised.translate_px": 9,
                                    "prepare.label_fraction": 0.2})
    before = (ws / "data/prepared/meta.json").read_text()
    result = run_cli(ws, "prepare", check=False)
    assert result.returncode == 2
    assert "refinery prepare: these params cannot work on the prepared data" in result.stderr
    assert "augment.supervised.translate_px" in result.stderr
    assert (ws / "data/prepared/meta.json").read_text() == before  # nothing written


@pytest.mark.slow
def test_check_params_shows_the_resolved_plan(prepared: Path, tmp_path: Path) -> None:
    ws = _copy(prepared, tmp_path, {"finetune.batch_size": 64, "finetune.epochs": 5,
                                    "pretrain.min_steps": 120})
    out = run_cli(ws, "check-params").stdout
    meta = json.loads((ws / "data/prepared/meta.json").read_text())
    labeled = meta["labeled"]
    assert f"finetune: {labeled} samples, batch {labeled // 4}" in out
    assert "pretrain: 1293 samples, batch 128, lr 0.5, 12 epochs x 10 steps = 120 steps" in out
    assert "note: finetune.batch_size 64 >" in out
    assert "warning: finetune runs only 20 optimizer steps (5 epochs x 4)" in out


def test_the_teacher_arch_is_checked_against_the_model_registry() -> None:
    from refinery import models

    assert {"resnet18", "resnet34", "resnet50", "student"} <= set(models.available())
    params = repo_params({"model.teacher.arch": "resnet19"})
    with pytest.raises(ParamsError, match=r"model.teacher.arch: unknown model 'resnet19'; "
                                          r"expected one of \['resnet18'"):
        check_plan(params, _meta(1293, 130))


def test_check_params_names_an_unknown_arch_before_any_data(tmp_path: Path) -> None:
    write_params(tmp_path, {"model.teacher.arch": "vit"})
    result = run_cli(tmp_path, "check-params", check=False)
    assert result.returncode == 2
    assert "model.teacher.arch: unknown model 'vit'" in result.stderr
