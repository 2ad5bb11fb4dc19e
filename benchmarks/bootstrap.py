"""What the bootstrap adds to ``evaluate``: CIFAR-10's size, 10,000 test images.

    python benchmarks/bootstrap.py   # prints the figures, writes docs/results/bootstrap.json

Times :func:`refinery.stages.evaluate.evidence.gather` as ``evaluate`` calls
it with the default params (1,000 resamples, 95%): five models and the
majority and chance baselines over 10 classes, with the four declared paired
differences. The predictions are synthetic (about 85% correct): the cost of
the matrix products does not depend on which answers are right. The linear
probe's fit is not part of the bootstrap and is not timed here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import write_result

from refinery.params import BootstrapParams
from refinery.pipeline import MODELS
from refinery.stages.evaluate import baselines
from refinery.stages.evaluate.evidence import gather
from refinery.stages.evaluate.uncertainty import Bootstrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    p = BootstrapParams()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.images)
    predictions = {row.name: np.where(rng.random(args.images) < 0.85, labels,
                                      rng.integers(0, args.classes, args.images))
                   for row in MODELS}
    rows = [baselines.chance(labels, args.classes),
            baselines.majority(labels, labels, args.classes)]
    comparisons = [(r.name, r.compared_to, r.step) for r in MODELS if r.compared_to]
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        boot = Bootstrap(args.images, p.resamples, p.seed, p.level)
        gather(boot, labels, args.classes, predictions, rows, comparisons, seed=p.seed)
        seconds.append(time.perf_counter() - start)
    figures = {"images": args.images, "classes": args.classes, "resamples": p.resamples,
               "models": len(predictions), "baselines_measured": 1,
               "differences": len(comparisons), "seconds": seconds,
               "median_seconds": float(np.median(seconds)), "target_seconds": 5.0}
    print(f"bootstrap on {args.images} images, {len(predictions)} models + majority, "
          f"{len(comparisons)} differences, {p.resamples} resamples: "
          f"median {np.median(seconds):.2f} s over {args.repeats} runs {seconds}")
    print(f"written: {write_result('bootstrap', figures)}")


if __name__ == "__main__":
    main()
