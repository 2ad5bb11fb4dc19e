"""One model's evaluation report, and the table that lines models up.

``evaluate_model`` takes a *prediction callable* (float images in [0, 1],
NCHW, on the CPU or on the ``device`` it is given -> logits), so an fp32
``nn.Module``, a compiled module, a model on the GPU (:mod:`.placement`) or a
loaded int8 ``.pt2`` are scored by the same code on the same images. Files
land in ``out_dir/<name>/``::

    metrics.json      flat numbers (also what DVC/MLflow log)
    per_class.json    precision, recall, F1, support per class
    calibration.json  reliability-diagram bins
    cost.json         size, latency and throughput, with the thread count
    confusion.png     confusion matrix with class names
    reliability.png   reliability diagram with the ECE

The folder is written as a whole (temporary sibling, then renamed), so a
crash never leaves a half report behind.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from refinery import fsutil, scoring
from refinery.params import EvaluateParams
from refinery.scoring import Predict, predict_logits
from refinery.stages.evaluate import corruptions, metrics
from refinery.stages.evaluate.cost import Cost, measure_cost

if TYPE_CHECKING:
    from refinery.stages.evaluate.evidence import Evidence


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of one batch's noise: fixed per (seed, batch), the same for every model."""
    return seed * 1_000_003 + batch_index


@dataclass(frozen=True)
class ModelReport:
    name: str
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    ece: float
    corruption_accuracy: dict[str, float]
    per_class: dict[str, dict[str, float]]
    images: int
    cost: Cost = field(default_factory=Cost)
    directory: Path | None = None
    # the predicted class of every clean test image, for the bootstrap and the plots
    predictions: np.ndarray | None = field(default=None, repr=False, compare=False)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for metrics files and experiment tracking (accuracies 0..1)."""
        out: dict[str, float] = {
            "accuracy": self.accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
        }
        out.update({f"accuracy_{k}": v for k, v in self.corruption_accuracy.items()})
        cost = self.cost
        if cost.parameters is not None:
            out["parameters"] = float(cost.parameters)
        if cost.file_mb is not None:
            out["file_mb"] = cost.file_mb
        if cost.latency is not None:
            out.update(latency_p50_ms=cost.latency.p50_ms, latency_p95_ms=cost.latency.p95_ms,
                       cpu_threads=float(cost.latency.threads))
        if cost.throughput is not None:
            out["cpu_images_per_s"] = cost.throughput.images_per_s
        if cost.gpu_throughput is not None:
            out["gpu_images_per_s"] = cost.gpu_throughput.images_per_s
        return out


def evaluate_model(
    predict: Predict,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str] | tuple[str, ...],
    params: EvaluateParams,
    out_dir: str | Path,
    name: str,
    *,
    seed: int = 0,
    cost_predict: Predict | None = None,
    parameters: int | None = None,
    file: str | Path | None = None,
    gpu_predict: Predict | None = None,
    device: torch.device | str = "cpu",
) -> ModelReport:
    """Score one model on clean and corrupted test images; write its report files.

    ``cost_predict`` (often ``predict`` itself) is timed for batch-1 latency and
    throughput with ``params.latency``; ``parameters`` and ``file`` fill the size
    columns; ``gpu_predict`` (a CUDA model) adds bf16 GPU throughput when CUDA
    is available. ``device``: where the scoring passes build their batches (the
    images move there once, the corruptions run there); ``predict`` takes them
    from there (see :mod:`.placement`). Costs are measured on the CPU regardless.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError("images must be uint8 (N, C, H, W)")
    if images_uint8.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError("need one label per image and at least one image")
    if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
        raise ValueError(f"labels must be in 0..{len(classes) - 1}")
    batch = params.batch_size
    images = images_uint8.to(device)
    logits = predict_logits(predict, images, batch)
    scores = metrics.classification_metrics(logits, labels, classes)
    cal = metrics.calibration(metrics.softmax(logits), labels, params.calibration_bins)

    robust: dict[str, float] = {}
    for corruption in corruptions.CORRUPTIONS:
        def transform(x: torch.Tensor, index: int, corruption: str = corruption) -> torch.Tensor:
            return corruptions.corrupt(corruption, x, params.corruptions, batch_seed(seed, index))

        robust[corruption] = scoring.accuracy(
            predict_logits(predict, images, batch, transform), labels
        )

    channels, height, width = (int(d) for d in images_uint8.shape[1:])
    cost = measure_cost(cost_predict, (channels, height, width), params.latency,
                        parameters=parameters, file=file, gpu_predict=gpu_predict)
    target = Path(out_dir) / name
    report = ModelReport(
        name=name, accuracy=scores.accuracy, macro_precision=scores.macro_precision,
        macro_recall=scores.macro_recall, macro_f1=scores.macro_f1, ece=cal.ece,
        corruption_accuracy=robust, per_class=scores.per_class,
        images=int(labels.shape[0]), cost=cost, directory=target,
        predictions=logits.argmax(dim=1).numpy(),
    )
    with fsutil.atomic_dir(target) as tmp:
        fsutil.write_json(tmp / "metrics.json", report.metrics())
        fsutil.write_json(tmp / "per_class.json", scores.per_class)
        fsutil.write_json(tmp / "calibration.json", cal.to_json())
        fsutil.write_json(tmp / "cost.json", cost.to_json())
        metrics.plot_confusion(scores.confusion, classes, tmp / "confusion.png",
                               title=f"{name}: confusion matrix")
        metrics.plot_reliability(cal, tmp / "reliability.png", title=name)
    return report


# ---------------------------------------------------------------- comparison


def _columns(reports: list[ModelReport], level: float | None
             ) -> list[tuple[str, Callable[[ModelReport], Any], str]]:
    """(header, value getter, format) per column; formats apply to the markdown only."""
    names: list[str] = []
    for report in reports:
        names.extend(k for k in report.corruption_accuracy if k not in names)

    def get(path: str) -> Callable[[ModelReport], Any]:
        def read(report: ModelReport) -> Any:
            node: Any = report.cost
            for part in path.split("."):
                node = getattr(node, part, None) if node is not None else None
            return node
        return read

    ci = "" if level is None else f" ({level:.0%} CI)"
    columns: list[tuple[str, Callable[[ModelReport], Any], str]] = [
        (f"accuracy %{ci}", lambda r: 100 * r.accuracy, ".2f"),
        (f"macro F1 %{ci}", lambda r: 100 * r.macro_f1, ".2f"),
        ("ECE", lambda r: r.ece, ".4f"),
    ]
    for key in names:
        columns.append((f"{key} acc %", lambda r, key=key: _pct(r.corruption_accuracy.get(key)),
                        ".2f"))
    columns += [
        ("params", get("parameters"), ",d"),
        ("file MB", get("file_mb"), ".3f"),
        ("p50 ms (b1)", get("latency.p50_ms"), ".2f"),
        ("p95 ms (b1)", get("latency.p95_ms"), ".2f"),
        ("CPU img/s", get("throughput.images_per_s"), ",.0f"),
        ("batch", get("throughput.batch"), "d"),
        ("threads", get("latency.threads"), "d"),
    ]
    if any(r.cost.gpu_throughput is not None for r in reports):
        columns.append(("GPU img/s (bf16)", get("gpu_throughput.images_per_s"), ",.0f"))
    return columns


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def comparison_table(reports: list[ModelReport], evidence: Evidence | None = None
                     ) -> tuple[str, str]:
    """All models side by side, then the baselines: ``(markdown, csv)``; rows are models.

    Markdown rounds for reading and puts each accuracy and macro F1 next to its
    interval; the CSV keeps full precision, intervals in ``_low``/``_high``
    columns. A figure that was not measured is blank (CSV) or an en dash
    (markdown). With ``evidence``, a model not better than the majority
    baseline is marked in its name cell.
    """
    columns = _columns(reports, None if evidence is None else evidence.level)
    headers = ["model", *(c[0] for c in columns)]
    csv_headers = ["model", "accuracy %", "macro F1 %",
                   "accuracy % low", "accuracy % high", "macro F1 % low", "macro F1 % high",
                   *(c[0] for c in columns[2:])] if evidence else headers
    md_rows = ["| " + " | ".join(headers) + " |",
               "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_headers)
    flagged = set(evidence.not_better_than_majority) if evidence else set()

    def interval_cells(name: str) -> list[Any]:
        if evidence is None:
            return []
        acc, f1 = evidence.accuracy.get(name), evidence.macro_f1.get(name)
        return [None if i is None else 100 * getattr(i, side)
                for i in (acc, f1) for side in ("low", "high")]

    for report in reports:
        values = [getter(report) for _, getter, _ in columns]
        cells = ["–" if v is None else format(v, fmt) for v, (_, _, fmt) in zip(values, columns,
                                                                             strict=True)]
        bounds = interval_cells(report.name)
        for index in (0, 1):  # the accuracy and macro F1 columns
            if bounds and bounds[2 * index] is not None:
                cells[index] += f" ({bounds[2 * index]:.1f}–{bounds[2 * index + 1]:.1f})"
        label = report.name + (" ⚠ not above majority" if report.name in flagged else "")
        md_rows.append("| " + " | ".join([label, *cells]) + " |")
        row = [report.name, *("" if v is None else v for v in values)]
        if evidence:
            row[3:3] = ["" if b is None else b for b in bounds]
        writer.writerow(row)
    for baseline in evidence.baselines if evidence else ():
        acc, f1 = evidence.accuracy.get(baseline.name), evidence.macro_f1.get(baseline.name)
        if acc is not None and f1 is not None:
            main = [100 * acc.estimate, 100 * f1.estimate]
            shown = [f"{100 * i.estimate:.2f} ({100 * i.low:.1f}–{100 * i.high:.1f})"
                     for i in (acc, f1)]
            bounds: list[Any] = [100 * acc.low, 100 * acc.high, 100 * f1.low, 100 * f1.high]
        else:  # chance: expected values, nothing was measured
            main = [100 * float(baseline.expected_accuracy or 0),
                    100 * float(baseline.expected_macro_f1 or 0)]
            shown = [f"{v:.2f} (expected)" for v in main]
            bounds = ["", "", "", ""]
        md_rows.append("| " + " | ".join([f"*{baseline.name}* (baseline)", *shown,
                                          *(["–"] * (len(columns) - 2))]) + " |")
        writer.writerow([baseline.name, *main, *bounds, *([""] * (len(columns) - 2))])
    return "\n".join(md_rows) + "\n", buffer.getvalue()
