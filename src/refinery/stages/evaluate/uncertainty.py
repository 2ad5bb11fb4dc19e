"""How sure a number from one run is: bootstrap intervals over the test images.

One test set is one sample of the images a model will meet. Resampling it
with replacement (``resamples`` times, seeded) gives the spread a metric
would have on other test sets of the same size; the central ``level`` share
of the resampled values is its percentile interval. Every model and baseline
is scored on the *same* resamples, so a difference between two models
(teacher minus scratch) is taken resample by resample: the paired interval
is tighter than the two separate ones, because the images both models find
hard cancel, and it says whether the difference can be told from zero.

Vectorised: each resample is a row of draw counts, and a metric on every
resample is one matrix product. 1,000 resamples of CIFAR-10's 10,000 test
images cost well under a second per model (``benchmarks/bootstrap.py``,
figures in ``docs/results/bootstrap.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float  # on the test set itself
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_json(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Resampled:
    """A metric on the test set and on every resample (kept for paired differences)."""

    interval: Interval
    samples: np.ndarray  # (resamples,)


class Bootstrap:
    """``resamples`` seeded resamples of ``n`` test images, shared by every metric and model."""

    def __init__(self, n: int, resamples: int, seed: int, level: float = 0.95) -> None:
        if n < 1 or resamples < 1 or not 0.0 < level < 1.0:
            raise ValueError("need n >= 1, resamples >= 1 and 0 < level < 1")
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, n, size=(resamples, n))
        offsets = (np.arange(resamples) * n)[:, None]
        # counts[b, i]: how often image i is drawn in resample b
        self.counts = np.bincount((draws + offsets).ravel(), minlength=resamples * n
                                  ).reshape(resamples, n).astype(np.float32)
        self.n, self.level, self.resamples = n, level, resamples

    def _interval(self, estimate: float, samples: np.ndarray) -> Interval:
        tail = 100 * (1 - self.level) / 2
        low, high = np.percentile(samples, [tail, 100 - tail])
        return Interval(float(estimate), float(low), float(high))

    def _check(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if values.shape[0] != self.n:
            raise ValueError(f"{values.shape[0]} values for a bootstrap over {self.n} images")
        return values

    def accuracy(self, correct: np.ndarray) -> Resampled:
        """``correct``: one bool per test image."""
        correct = self._check(correct).astype(np.float32)
        samples = self.counts @ correct / self.n
        return Resampled(self._interval(float(correct.mean()), samples), samples)

    def macro_f1(self, labels: np.ndarray, predictions: np.ndarray, classes: int) -> Resampled:
        """Macro F1 on every resample from per-class true positives, predicted and actual
        counts: three ``(resamples, classes)`` products, so memory grows with classes, not
        classes squared. A class with no true and no predicted image scores F1 = 0, as
        scikit-learn's ``zero_division=0`` does."""
        labels = self._check(labels).astype(np.int64)
        predictions = self._check(predictions).astype(np.int64)
        actual = np.eye(classes, dtype=np.float32)[labels]
        predicted = np.eye(classes, dtype=np.float32)[predictions]
        hits = actual * (labels == predictions)[:, None]
        full = _macro_f1(hits.sum(0)[None], predicted.sum(0)[None], actual.sum(0)[None])
        samples = _macro_f1(self.counts @ hits, self.counts @ predicted, self.counts @ actual)
        return Resampled(self._interval(float(full[0]), samples), samples)

    def difference(self, a: Resampled, b: Resampled) -> Interval:
        """``a - b`` on the same resamples (a paired interval)."""
        return self._interval(a.interval.estimate - b.interval.estimate, a.samples - b.samples)


def _macro_f1(tp: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    denominator = predicted + actual
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape, dtype=np.float64),
                   where=denominator > 0)
    return f1.mean(axis=1)
