"""Classification and calibration metrics, and their plots.

Inputs are logits or probabilities ``(N, K)`` and integer labels ``(N,)``
(torch tensors or arrays). Classes with no test images still get a row (with
zeros), so reports of different models line up class by class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinery import fsutil
from refinery.scoring import accuracy

ArrayLike = torch.Tensor | np.ndarray


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().float().numpy() if values.is_floating_point() \
            else values.detach().cpu().numpy()
    return np.asarray(values)


def softmax(logits: ArrayLike) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    z = _numpy(logits).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class ClassificationMetrics:
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # class -> precision, recall, f1, support
    confusion: np.ndarray  # (K, K) counts, rows: true class, columns: predicted


def classification_metrics(
    scores: ArrayLike, labels: ArrayLike, classes: list[str] | tuple[str, ...]
) -> ClassificationMetrics:
    """Top-1 accuracy, macro precision/recall/F1, per-class report, confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y = _numpy(labels).astype(np.int64)
    pred = _numpy(scores).argmax(axis=1)
    ids = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=ids, average=None, zero_division=0
    )
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    return ClassificationMetrics(
        accuracy=accuracy(scores, labels),
        macro_precision=float(np.mean(precision)),
        macro_recall=float(np.mean(recall)),
        macro_f1=float(np.mean(f1)),
        per_class=per_class,
        confusion=confusion_matrix(y, pred, labels=ids),
    )


@dataclass(frozen=True)
class Calibration:
    """Reliability-diagram data: ``n_bins`` equal-width confidence bins on [0, 1]."""

    ece: float
    edges: np.ndarray  # (n_bins + 1,)
    counts: np.ndarray  # images per bin
    accuracy: np.ndarray  # per bin; NaN where empty
    confidence: np.ndarray  # mean max-probability per bin; NaN where empty

    def to_json(self) -> dict[str, Any]:
        def clean(values: np.ndarray) -> list[float | None]:
            return [None if np.isnan(v) else float(v) for v in values]

        return {"ece": self.ece, "edges": self.edges.tolist(), "counts": self.counts.tolist(),
                "accuracy": clean(self.accuracy), "confidence": clean(self.confidence)}


def calibration(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> Calibration:
    """Expected calibration error with equal-width bins.

    ECE = sum over bins of (bin count / N) * |accuracy(bin) - mean confidence(bin)|,
    where confidence is the top-class probability. Bins are ``(lo, hi]``;
    the first also holds confidence 0.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    probs = _numpy(probabilities).astype(np.float64)
    y = _numpy(labels)
    if probs.shape[0] == 0:
        raise ValueError("calibration of an empty set is undefined")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_acc = np.bincount(index, weights=correct, minlength=n_bins) / counts
        bin_conf = np.bincount(index, weights=confidence, minlength=n_bins) / counts
    gaps = np.where(counts > 0, np.abs(bin_acc - bin_conf), 0.0)
    ece = float(np.sum(counts / probs.shape[0] * gaps))
    return Calibration(ece=ece, edges=edges, counts=counts, accuracy=bin_acc,
                       confidence=bin_conf)


def expected_calibration_error(probabilities: ArrayLike, labels: ArrayLike,
                               n_bins: int = 15) -> float:
    return calibration(probabilities, labels, n_bins).ece


# ------------------------------------------------------------------------ plots


def _figure(width: float, height: float):  # -> (Figure, Axes)
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def _save(figure: Any, path: Path) -> Path:
    with fsutil.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
    return path


def plot_confusion(confusion: np.ndarray, classes: list[str] | tuple[str, ...],
                   path: str | Path, title: str = "Confusion matrix") -> Path:
    """Row-normalized confusion matrix with counts, class names on both axes."""
    k = len(classes)
    side = max(4.0, 0.55 * k + 2.0)
    figure, ax = _figure(side, side)
    totals = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, totals, out=np.zeros(confusion.shape, dtype=float),
                      where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    return _save(figure, Path(path))


def plot_reliability(cal: Calibration, path: str | Path,
                     title: str = "Reliability diagram") -> Path:
    """Per-bin accuracy vs confidence bars against the diagonal, with the ECE."""
    figure, ax = _figure(5.0, 5.0)
    centers = (cal.edges[:-1] + cal.edges[1:]) / 2
    width = cal.edges[1] - cal.edges[0]
    filled = cal.counts > 0
    ax.bar(centers[filled], cal.accuracy[filled], width=width, edgecolor="black",
           label="accuracy")
    ax.bar(centers[filled], (cal.confidence - cal.accuracy)[filled], bottom=cal.accuracy[filled],
           width=width, color="tab:red", alpha=0.35, label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {cal.ece:.3f})")
    ax.legend(loc="upper left")
    return _save(figure, Path(path))
