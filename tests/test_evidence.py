"""Intervals and baselines checked against brute force, scikit-learn and hand counts."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from sklearn.metrics import f1_score

from refinery.stages.evaluate import baselines
from refinery.stages.evaluate.evidence import gather
from refinery.stages.evaluate.report import ModelReport, comparison_table
from refinery.stages.evaluate.uncertainty import Bootstrap


def _picks(boot: Bootstrap, b: int) -> np.ndarray:
    """Resample ``b`` as the list of image indices it draws."""
    return np.repeat(np.arange(boot.n), boot.counts[b].astype(int))


def test_bootstrap_metrics_equal_brute_force_resampling() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    predictions = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, 200))
    boot = Bootstrap(200, resamples=300, seed=5)
    assert (boot.counts.sum(axis=1) == 200).all()  # every resample draws n images
    accuracy = boot.accuracy(predictions == labels)
    brute = [np.mean(predictions[_picks(boot, b)] == labels[_picks(boot, b)])
             for b in range(300)]
    assert accuracy.samples == pytest.approx(np.array(brute), abs=1e-6)
    assert accuracy.interval.estimate == pytest.approx(np.mean(predictions == labels))
    low, high = np.percentile(brute, [2.5, 97.5])
    assert (accuracy.interval.low, accuracy.interval.high) == pytest.approx((low, high), abs=1e-6)

    f1 = boot.macro_f1(labels, predictions, 3)
    assert f1.interval.estimate == pytest.approx(f1_score(labels, predictions, average="macro"))
    for b in (0, 1, 299):
        picks = _picks(boot, b)
        assert f1.samples[b] == pytest.approx(f1_score(
            labels[picks], predictions[picks], average="macro", labels=[0, 1, 2],
            zero_division=0))


def test_the_same_seed_gives_the_same_resamples_and_a_wrong_length_is_refused() -> None:
    assert (Bootstrap(50, 20, seed=3).counts == Bootstrap(50, 20, seed=3).counts).all()
    assert not (Bootstrap(50, 20, seed=3).counts == Bootstrap(50, 20, seed=4).counts).all()
    with pytest.raises(ValueError, match="49 values for a bootstrap over 50 images"):
        Bootstrap(50, 20, seed=0).accuracy(np.ones(49, dtype=bool))


def test_a_paired_interval_sees_a_small_real_difference_that_separate_ones_cannot() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(1000) < 0.8
    b = a & (rng.random(1000) < 0.97)  # b: a's hits, minus ~2.4%
    boot = Bootstrap(1000, resamples=1000, seed=0)
    ia, ib = boot.accuracy(a), boot.accuracy(b)
    paired = boot.difference(ia, ib)
    assert paired.estimate == pytest.approx(a.mean() - b.mean())
    assert paired.low > 0  # the paired interval tells b is worse ...
    assert ib.interval.high > ia.interval.low  # ... where the two intervals overlap


def test_chance_and_majority_by_hand() -> None:
    test = np.array([0, 0, 0, 1, 2, 2])
    chance = baselines.chance(test, 3)
    assert chance.expected_accuracy == pytest.approx(1 / 3)
    # class shares 1/2, 1/6, 1/3 against recall 1/3: F1_k = 2 p r / (p + r)
    f1 = [2 * p * (1 / 3) / (p + 1 / 3) for p in (1 / 2, 1 / 6, 1 / 3)]
    assert chance.expected_macro_f1 == pytest.approx(np.mean(f1))
    majority = baselines.majority(np.array([2, 2, 1, 0, 2]), test, 3)
    assert (majority.predictions == 2).all()  # the labeled subset's most frequent class


def _report(name: str, predictions: np.ndarray, labels: np.ndarray) -> ModelReport:
    f1 = f1_score(labels, predictions, average="macro")
    return ModelReport(name=name, accuracy=float(np.mean(predictions == labels)),
                       macro_precision=0.0, macro_recall=0.0, macro_f1=float(f1), ece=0.0,
                       corruption_accuracy={}, per_class={}, images=len(labels),
                       predictions=predictions)


def test_evidence_flags_a_model_no_better_than_majority_and_words_each_difference() -> None:
    rng = np.random.default_rng(2)
    labels = np.where(rng.random(400) < 0.6, 0, rng.integers(1, 4, 400))  # class 0: ~70%
    good = np.where(rng.random(400) < 0.9, labels, (labels + 1) % 4)
    lazy = np.where(rng.random(400) < 0.97, 0, (labels + 1) % 4)  # majority, or wrong
    redrawn = np.where(rng.random(400) < 0.9, labels, (labels + 1) % 4)  # good's accuracy
    noisy_good = np.where(rng.random(400) < 0.1, redrawn, good)  # 10% redrawn: no real change
    boot = Bootstrap(400, resamples=1000, seed=0)
    rows = [baselines.chance(labels, 4), baselines.majority(labels, labels, 4)]
    predictions = {"good": good, "lazy": lazy, "noisy": noisy_good}
    evidence = gather(boot, labels, 4, predictions, rows,
                      [("good", "lazy", "Learning"), ("noisy", "good", "Noise")], seed=0)
    assert evidence.not_better_than_majority == ("lazy",)
    learning, noise = evidence.differences
    assert learning.distinguishable and learning.accuracy.low > 0
    assert not noise.distinguishable and noise.accuracy.contains(0.0)
    text = evidence.markdown()
    assert "- Learning: good minus lazy = " in text and "distinguishable from 0)" in text
    assert "- Noise: noisy minus good = " in text and "not distinguishable from 0)" in text
    assert "WARNING: lazy is not better than the majority baseline" in text
    metrics = evidence.metrics()
    assert metrics["good_minus_lazy"]["accuracy"] == pytest.approx(
        np.mean(good == labels) - np.mean(lazy == labels))
    assert metrics["chance"] == {"accuracy": 0.25, "macro_f1": pytest.approx(
        rows[0].expected_macro_f1)}

    reports = [_report(name, p, labels) for name, p in predictions.items()]
    markdown, table = comparison_table(reports, evidence)
    assert "| model | accuracy % (95% CI) | macro F1 % (95% CI) |" in markdown
    acc = evidence.accuracy["good"]
    assert (f"| good | {100 * acc.estimate:.2f} ({100 * acc.low:.1f}–{100 * acc.high:.1f}) |"
            in markdown)
    assert "| lazy ⚠ not above majority |" in markdown
    assert "| *majority* (baseline) |" in markdown and "| *chance* (baseline) | 25.00" in markdown
    parsed = {r["model"]: r for r in csv.DictReader(io.StringIO(table))}
    assert list(parsed) == ["good", "lazy", "noisy", "chance", "majority"]
    assert float(parsed["good"]["accuracy % low"]) == pytest.approx(100 * acc.low)
    assert float(parsed["majority"]["accuracy %"]) == pytest.approx(
        100 * np.mean(labels == 0))
    assert parsed["chance"]["accuracy % low"] == ""
