"""What one run's test scores can and cannot say: intervals, paired differences, flags.

Gathers the bootstrap (:mod:`.uncertainty`) over every model's and
baseline's test predictions into one :class:`Evidence`: a 95% interval on
accuracy and macro F1 per row, a paired interval per declared comparison
(``ModelRow.compared_to``: teacher - scratch, student - teacher, int8 -
student, ...), and the models that are not better than the majority
baseline (their paired accuracy difference to it does not exclude 0). The
report's sentences are written from it, so a difference whose interval
holds 0 is never stated as an effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from refinery.stages.evaluate.baselines import Baseline
from refinery.stages.evaluate.uncertainty import Bootstrap, Interval, Resampled


@dataclass(frozen=True)
class Difference:
    name: str
    compared_to: str
    step: str
    accuracy: Interval
    macro_f1: Interval

    @property
    def key(self) -> str:
        return f"{self.name}_minus_{self.compared_to}"

    @property
    def distinguishable(self) -> bool:
        return not self.accuracy.contains(0.0)

    def sentence(self, level: float) -> str:
        a, f = self.accuracy, self.macro_f1
        verdict = ("distinguishable from 0" if self.distinguishable
                   else "not distinguishable from 0")
        return (f"- {self.step}: {self.name} minus {self.compared_to} = "
                f"{100 * a.estimate:+.2f} accuracy points ({level:.0%} CI "
                f"{100 * a.low:+.2f} to {100 * a.high:+.2f}: {verdict}); macro F1 "
                f"{100 * f.estimate:+.2f} ({100 * f.low:+.2f} to {100 * f.high:+.2f})")

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "accuracy": self.accuracy.to_json(),
                "macro_f1": self.macro_f1.to_json(), "distinguishable": self.distinguishable}


@dataclass(frozen=True)
class Evidence:
    level: float
    resamples: int
    seed: int
    accuracy: dict[str, Interval]  # every model and measured baseline
    macro_f1: dict[str, Interval]
    baselines: tuple[Baseline, ...]
    differences: tuple[Difference, ...]
    not_better_than_majority: tuple[str, ...]

    def metrics(self) -> dict[str, dict[str, float]]:
        """Nested like the models' metrics: intervals per row, and one group per difference."""
        out: dict[str, dict[str, float]] = {}
        for name, acc in self.accuracy.items():
            f1 = self.macro_f1[name]
            out[name] = {"accuracy": acc.estimate, "accuracy_low": acc.low,
                         "accuracy_high": acc.high, "macro_f1": f1.estimate,
                         "macro_f1_low": f1.low, "macro_f1_high": f1.high}
        for baseline in self.baselines:
            if baseline.expected_accuracy is not None:
                out[baseline.name] = {"accuracy": baseline.expected_accuracy,
                                      "macro_f1": float(baseline.expected_macro_f1 or 0.0)}
        for d in self.differences:
            out[d.key] = {"accuracy": d.accuracy.estimate, "accuracy_low": d.accuracy.low,
                          "accuracy_high": d.accuracy.high, "macro_f1": d.macro_f1.estimate,
                          "macro_f1_low": d.macro_f1.low, "macro_f1_high": d.macro_f1.high}
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level, "resamples": self.resamples, "seed": self.seed,
            "accuracy": {k: v.to_json() for k, v in self.accuracy.items()},
            "macro_f1": {k: v.to_json() for k, v in self.macro_f1.items()},
            "baselines": {b.name: b.about for b in self.baselines},
            "differences": {d.key: d.to_json() for d in self.differences},
            "not_better_than_majority": list(self.not_better_than_majority),
        }

    def markdown(self) -> str:
        """The sentences under the comparison table."""
        lines = ["", f"Intervals: {self.level:.0%} percentile bootstrap over the test images "
                 f"({self.resamples} resamples, seed {self.seed}); differences are paired "
                 "(both models on the same resamples)."]
        lines += [d.sentence(self.level) + "." for d in self.differences]
        lines += [f"- Baseline {b.name}: {b.about}." for b in self.baselines]
        for name in self.not_better_than_majority:
            lines.append(f"- WARNING: {name} is not better than the majority baseline (its "
                         "accuracy minus majority's interval includes 0 or lies below it).")
        return "\n".join(lines) + "\n"


def gather(bootstrap: Bootstrap, labels: np.ndarray, classes: int,
           predictions: Mapping[str, np.ndarray], baselines: Sequence[Baseline],
           comparisons: Sequence[tuple[str, str, str]], *, seed: int) -> Evidence:
    """``predictions``: per model, its test predictions; ``comparisons``:
    ``(model, compared_to, step)``."""
    measured = dict(predictions)
    measured.update({b.name: b.predictions for b in baselines if b.predictions is not None})
    accuracy: dict[str, Resampled] = {}
    f1: dict[str, Resampled] = {}
    for name, predicted in measured.items():
        accuracy[name] = bootstrap.accuracy(predicted == labels)
        f1[name] = bootstrap.macro_f1(labels, predicted, classes)
    differences = tuple(
        Difference(a, b, step, bootstrap.difference(accuracy[a], accuracy[b]),
                   bootstrap.difference(f1[a], f1[b]))
        for a, b, step in comparisons)
    flagged: tuple[str, ...] = ()
    if "majority" in accuracy:
        flagged = tuple(name for name in predictions
                        if bootstrap.difference(accuracy[name], accuracy["majority"]).low <= 0)
    return Evidence(
        level=bootstrap.level, resamples=bootstrap.resamples, seed=seed,
        accuracy={k: v.interval for k, v in accuracy.items()},
        macro_f1={k: v.interval for k, v in f1.items()},
        baselines=tuple(baselines), differences=differences,
        not_better_than_majority=flagged)
