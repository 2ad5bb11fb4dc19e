"""What every model must beat: chance, the majority class, and the pretrained features alone.

Rows of the comparison, scored on the same test images and bootstrap
resamples as the models (:mod:`refinery.stages.evaluate.uncertainty`):

- ``chance``: uniform guessing, stated as its expected accuracy ``1 / classes``
  and expected macro F1 on this test set's class shares (no predictor, so no
  interval);
- ``majority``: always the most frequent class of the labeled subset (the
  labels the models were trained on); on an unbalanced test set it can sit
  far above chance, and it is the floor a model must clear;
- ``linear_probe``: logistic regression on the *frozen* features of the
  pretrained backbone, fitted on the labeled subset (its penalty chosen on
  val): what self-supervised pretraining learned by itself, before any
  fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refinery import models
from refinery.probe import fit_probe
from refinery.scoring import predict_logits
from refinery.stages.evaluate.placement import Placement

#: The baselines' rows, as reports list them after the models.
NAMES = ("linear_probe", "majority", "chance")


@dataclass(frozen=True)
class Baseline:
    name: str
    about: str
    predictions: np.ndarray | None  # per test image; None for chance (nothing predicts)
    expected_accuracy: float | None = None  # chance only: stated, not measured
    expected_macro_f1: float | None = None


def chance(test_labels: np.ndarray, classes: int) -> Baseline:
    """A uniform guess: precision of class k is its test share, recall is ``1 / classes``."""
    share = np.bincount(test_labels, minlength=classes) / len(test_labels)
    recall = 1.0 / classes
    f1 = np.divide(2 * share * recall, share + recall, out=np.zeros(classes),
                   where=(share + recall) > 0)
    return Baseline("chance", "a uniform random guess (expected values)", None,
                    expected_accuracy=recall, expected_macro_f1=float(f1.mean()))


def majority(labeled_labels: np.ndarray, test_labels: np.ndarray, classes: int) -> Baseline:
    most = int(np.bincount(labeled_labels, minlength=classes).argmax())
    return Baseline("majority", "always the labeled subset's most frequent class",
                    np.full(len(test_labels), most))


def linear_probe(pretrained_dir: Path, labeled_images: torch.Tensor,
                 labeled_labels: np.ndarray, val_images: torch.Tensor, val_labels: np.ndarray,
                 test_images: torch.Tensor, classes: int, batch_size: int,
                 placement: Placement | None = None) -> Baseline:
    """Logistic regression on the frozen features, its L2 chosen on val: the same probe
    LP-FT starts fine-tuning from (:func:`refinery.probe.fit_probe`).

    ``placement``: where the backbone computes the features (the CPU when ``None``);
    the probe is fitted on the CPU.
    """
    placement = placement or Placement()
    backbone = models.load_model(pretrained_dir).eval()  # saved without a head: features
    features = placement.predictor(backbone)
    train, val, test = (predict_logits(features, images.to(placement.device), batch_size)
                        for images in (labeled_images, val_images, test_images))
    probe = fit_probe(train, torch.from_numpy(labeled_labels), val,
                      torch.from_numpy(val_labels), classes)
    return Baseline("linear_probe", "logistic regression on the frozen pretrained features, "
                    f"fitted on the labeled subset (L2 {probe.l2:g}, chosen on val)",
                    probe.logits(test).argmax(1).numpy())
