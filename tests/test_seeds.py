"""Seed statistics checked against numbers computed by hand and by SciPy."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from scipy import stats

from refinery.seeds import queue_states, summarize, summary_csv, summary_markdown

ACCURACY = {  # known test accuracies of three models over five seeds
    0: {"scratch": 0.80, "teacher": 0.84, "student": 0.83},
    1: {"scratch": 0.82, "teacher": 0.85, "student": 0.85},
    2: {"scratch": 0.79, "teacher": 0.83, "student": 0.82},
    3: {"scratch": 0.81, "teacher": 0.86, "student": 0.84},
    4: {"scratch": 0.83, "teacher": 0.84, "student": 0.84},
}
# what metrics/evaluate.json holds per seed: models, baselines and difference groups
PER_SEED = {seed: {**{m: {"accuracy": a, "macro_f1": a - 0.01} for m, a in models.items()},
                   "majority": {"accuracy": 0.1, "macro_f1": 0.02},
                   "teacher_minus_scratch": {"accuracy": models["teacher"] - models["scratch"]}}
            for seed, models in ACCURACY.items()}
COMPARISONS = [("teacher", "scratch", "Pretraining"), ("student", "teacher", "Distillation")]


def test_mean_std_and_the_paired_t_interval() -> None:
    summary = summarize(PER_SEED, COMPARISONS, order=["teacher", "student", "scratch"])
    assert summary.seeds == (0, 1, 2, 3, 4)
    assert [m.name for m in summary.models if m.metric == "accuracy"] == [
        "teacher", "student", "scratch", "majority"]  # as ordered, the unknown after
    assert {m.name for m in summary.models} == {"scratch", "teacher", "student", "majority"}
    scratch = summary.model("scratch")
    assert scratch.mean == pytest.approx(0.81)
    # deviations from 0.81: -.01, .01, -.02, 0, .02 -> sum of squares 0.001, over n - 1 = 4
    assert scratch.std == pytest.approx(math.sqrt(0.001 / 4))
    assert summary.model("scratch", "macro_f1").mean == pytest.approx(0.80)
    pretraining, distillation = summary.differences
    d = [0.04, 0.03, 0.04, 0.05, 0.01]
    assert pretraining.differences == pytest.approx(tuple(d))
    assert pretraining.mean == pytest.approx(0.034)
    half = stats.t.ppf(0.975, 4) * np.std(d, ddof=1) / math.sqrt(5)  # t(0.975, 4) = 2.776
    assert pretraining.interval == pytest.approx((0.034 - half, 0.034 + half))
    low, high = stats.t.interval(0.95, 4, loc=np.mean(d), scale=stats.sem(d))
    assert pretraining.interval == pytest.approx((low, high))  # what SciPy says, too
    assert pretraining.distinguishable  # the whole interval is above 0
    assert distillation.differences == pytest.approx((-0.01, 0.0, -0.01, -0.02, 0.0))
    metrics = summary.metrics()
    assert metrics["teacher_minus_scratch.accuracy_mean"] == pytest.approx(0.034)
    assert metrics["teacher_minus_scratch.accuracy_low"] == pytest.approx(low)
    assert metrics["scratch.accuracy_std"] == pytest.approx(scratch.std)


def test_a_difference_whose_interval_holds_zero_is_said_so() -> None:
    per_seed = {s: {"a": {"accuracy": 0.5 + 0.01 * (-1) ** s}, "b": {"accuracy": 0.5}}
                for s in range(4)}
    summary = summarize(per_seed, [("a", "b", "Step")])
    (diff,) = summary.differences
    assert diff.mean == pytest.approx(0.0) and not diff.distinguishable
    text = summary_markdown(summary, "x", "refinery seeds --seeds 0 1 2 3")
    assert "- Step: a minus b = +0.00" in text and "not distinguishable from 0" in text
    assert "Command: `refinery seeds --seeds 0 1 2 3`" in text


def test_one_seed_has_no_interval_and_claims_nothing() -> None:
    summary = summarize({7: PER_SEED[0]}, COMPARISONS)
    assert summary.model("teacher").std == 0.0
    assert all(math.isnan(x) for x in summary.differences[0].interval)
    assert not summary.differences[0].distinguishable
    assert "one seed: no interval" in summary_markdown(summary, "x", "c")
    assert "teacher_minus_scratch.accuracy_low" not in summary.metrics()


def test_the_csv_has_every_seed_and_the_interval() -> None:
    summary = summarize(PER_SEED, COMPARISONS)
    rows = {(r["row"], r["metric"]): r for r in csv.DictReader(io.StringIO(summary_csv(summary)))}
    teacher = rows[("teacher", "accuracy")]
    assert [float(teacher[f"seed_{s}"]) for s in range(5)] == [0.84, 0.85, 0.83, 0.86, 0.84]
    assert float(teacher["min"]) == 0.83 and float(teacher["max"]) == 0.86
    diff = rows[("teacher - scratch", "accuracy")]
    assert float(diff["ci_low"]) == pytest.approx(summary.differences[0].interval[0])


def test_queue_status_is_read_by_name() -> None:
    status = """Task     Name      Created    Status
f52a0d5  t1-seed0  03:46 AM   Success
a1b2c3d  t1-seed1  03:46 AM   Running
e4f5a6b  t1-seed2  03:47 AM   Queued
0000000  t1-seed3  03:47 AM   Failed

Worker status: 1 active, 0 idle
"""
    assert queue_states(status) == {"t1-seed0": "Success", "t1-seed1": "Running",
                                    "t1-seed2": "Queued", "t1-seed3": "Failed"}


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "1", "1"], "seeds must be distinct non-negative integers"),
    (["--seeds", "0", "1", "--jobs", "0"], "--jobs must be >= 1"),
    (["--set", "seed=3"], "seed is what `refinery seeds` varies"),
    (["--set", "evaluate.bootstrap.level=2"], "evaluate.bootstrap.level"),
])
def test_bad_seeds_or_params_are_refused_before_any_work(tmp_path, args, message) -> None:
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    done = subprocess.run([sys.executable, "-m", "refinery", "seeds", "--name", "t", *args],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / ".dvc").exists() and not (tmp_path / "reports").exists()
