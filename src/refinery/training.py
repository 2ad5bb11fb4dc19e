"""Pieces every training stage shares: inference over a split, kNN, curves on disk."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refinery import fsutil, models, paths
from refinery.engine.checkpoint import Checkpointer
from refinery.engine.data import DeviceData, to_float
from refinery.engine.runtime import Runtime
from refinery.formats.policies import POLICIES_FILE

EVAL_BATCH = 1024


@torch.no_grad()
def run_model(model: nn.Module, data: DeviceData, rt: Runtime, features: bool = False,
              batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits (or pooled features) for every image of ``data``, in order, as float32."""
    was_training = model.training
    model.eval()
    outputs = []
    fn = model.features if features else model
    for idx in data.batches(batch_size):
        x = to_float(data.images(idx), rt.channels_last)
        with rt.autocast():
            outputs.append(fn(x).float())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


@torch.no_grad()
def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                 query_features: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018), the usual SSL monitor.

    Always in float32, even when called under autocast: bf16 similarities would be
    coarse, and their votes would not match the float32 tally (a crash with
    ``engine.amp: bf16``, found on the CPU; the CUDA default is bf16).
    """
    with torch.autocast(train_features.device.type, enabled=False):
        return _knn_accuracy(train_features.float(), train_labels, query_features.float(),
                             query_labels, num_classes, k, temperature, chunk)


def _knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                  query_features: torch.Tensor, query_labels: torch.Tensor,
                  num_classes: int, k: int, temperature: float, chunk: int) -> float:
    bank = F.normalize(train_features, dim=1)
    labels = train_labels.to(bank.device)
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, query_features.shape[0], chunk):
        q = F.normalize(query_features[start:start + chunk], dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, labels[idx], weights)
        correct += int((votes.argmax(1) == query_labels[start:start + chunk].to(q.device)).sum())
    return correct / max(query_features.shape[0], 1)


def write_history_csv(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Per-epoch curves as CSV, the format ``dvc plots`` reads."""
    columns: list[str] = ["epoch"]
    for row in history:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in columns})
    return fsutil.write_text(path, buffer.getvalue())


def plot_history(history: Sequence[dict[str, float]], groups: dict[str, Sequence[str]],
                 path: Path, title: str) -> Path:
    """One panel per group of curves (e.g. losses, accuracies, learning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {name: [k for k in keys if any(k in row for row in history)]
              for name, keys in groups.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.4))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    for ax, (name, keys) in zip(axes, panels.items(), strict=False):
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if key in row]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=key)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with fsutil.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


@dataclass
class TrainResult:
    """What a training stage returns: its metrics (for DVC and MLflow) and its curves."""

    metrics_: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    warnings: tuple[str, ...] = ()  # e.g. too few optimizer steps: logged, tagged on the run

    def metrics(self) -> dict[str, float]:
        return dict(self.metrics_)


@dataclass(frozen=True)
class TrainingFiles:
    """Where a training stage reads and writes; :meth:`for_stage` is the pipeline's layout."""

    out_dir: Path  # the trained model (model.pt + config.json)
    checkpoint_dir: Path
    plots_csv: Path  # per-epoch curves for dvc plots
    curves_png: Path
    prepared_dir: Path = paths.PREPARED
    policies: Path = paths.AUGMENT / POLICIES_FILE

    @classmethod
    def for_stage(cls, stage: str, out_dir: Path) -> TrainingFiles:
        return cls(out_dir=out_dir, checkpoint_dir=paths.CHECKPOINTS / stage,
                   plots_csv=paths.PLOTS / f"{stage}.csv",
                   curves_png=paths.reports_dir(stage) / "curves.png")


def finish_training(rt: Runtime, ckpt: Checkpointer, model: nn.Module, *, files: TrainingFiles,
                    extra: dict, history: list[dict[str, float]],
                    curves: dict[str, Sequence[str]], title: str, metrics: dict[str, float],
                    warnings: Sequence[str] = ()) -> TrainResult:
    """Rank 0 writes the model, the curves (CSV for DVC, PNG); then the checkpoint goes.

    The checkpoint is removed only after the outputs exist, so a crash while
    writing them resumes from the end of training instead of starting over.
    """
    if rt.is_main:
        models.save_model(model, files.out_dir, extra=extra)  # no metrics: timings differ
        write_history_csv(history, files.plots_csv)
        plot_history(history, curves, files.curves_png, title)
    rt.barrier()
    if rt.is_main:
        ckpt.clear()
    rt.close()
    return TrainResult(metrics, history, tuple(warnings))
