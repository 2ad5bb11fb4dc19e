"""The ``evaluate`` stage: every model the pipeline made, scored the same way on test.

Rows: :data:`refinery.pipeline.MODELS`, in order (the scratch baseline, the
fine-tuned teacher, the distilled student, the int8 student, ...). Each gets
accuracy, macro P/R/F1, calibration, robustness to corruptions and its cost,
and the baselines every model must beat (chance, majority class, a linear
probe on the frozen pretrained features) share the table. Each accuracy and
macro F1 carries a bootstrap interval, and each declared comparison a paired
one (:mod:`.evidence`), so one run's difference is stated with its
uncertainty, never as a bare fact.
Costs are stated as measured: fp32 models run eagerly (as ``load_model`` gives
them), int8 programs run compiled to oneDNN int8 kernels (what they are for);
an int8 row's fp32 source is also timed compiled, so the int8 speed-up is not
flattered by comparing a compiled model with an eager one. The scoring passes
(accuracy, corruptions, confusion) of the float models run where the engine
would train (:mod:`.placement`: the GPU when present), the int8 program's and
every latency figure on the CPU. Under the table,
one sentence per row that declares what it is ``compared_to``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refinery import fsutil, models, paths, stage
from refinery.engine.runtime import Runtime, make_runtime
from refinery.formats import int8 as int8_format
from refinery.formats.prepared import load_prepared, load_split
from refinery.params import EvaluateParams, Params
from refinery.pipeline import MODELS, ModelRow, int8_row, model_row, stage_named
from refinery.stages.evaluate import baselines
from refinery.stages.evaluate import cost as cost_lib
from refinery.stages.evaluate.evidence import Evidence, gather
from refinery.stages.evaluate.placement import Placement, prediction_placement
from refinery.stages.evaluate.report import ModelReport, comparison_table, evaluate_model
from refinery.stages.evaluate.uncertainty import Bootstrap

log = logging.getLogger(__name__)

@dataclass
class EvaluateResult:
    reports: dict[str, ModelReport]
    compiled_latency_ms: dict[str, float]  # fp32 sources of int8 rows, timed compiled
    table_markdown: str
    evidence: Evidence

    def metrics(self) -> dict[str, dict[str, float]]:
        """Nested per model, baseline and difference: the form ``dvc metrics`` shows side
        by side (``<model>.accuracy_low``/``_high``, ``teacher_minus_scratch.accuracy``)."""
        out = {name: report.metrics() for name, report in self.reports.items()}
        for name, latency in self.compiled_latency_ms.items():
            out[name]["latency_p50_ms_compiled"] = latency
        for name, values in self.evidence.metrics().items():
            out.setdefault(name, {}).update(values)
        return out

    def headline(self) -> dict[str, float]:
        """A few flat numbers for the pipeline's parent run and the registry gate."""
        flat: dict[str, float] = {}
        for name, report in self.reports.items():
            flat[f"{name}.accuracy"] = report.accuracy
            if report.cost.latency is not None:
                flat[f"{name}.latency_p50_ms"] = report.cost.latency.p50_ms
        return flat


def _padded(predict: Callable[[torch.Tensor], torch.Tensor], batch: int
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run a fixed-shape (compiled) model on any batch <= ``batch`` by zero-padding.

    The int8 model is compiled for static shapes; a short last batch would
    otherwise cost a fresh compilation.
    """
    def run(images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if n in (1, batch) or n > batch:
            return predict(images)
        pad = images.new_zeros((batch - n, *images.shape[1:]))
        return predict(torch.cat([images, pad]))[:n]

    return run


def _fp32_predict(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model = model.eval()

    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        return model(images)

    return run


def _gpu_predict(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if not torch.cuda.is_available():
        return None
    import copy

    gpu_model = copy.deepcopy(model).cuda().eval().to(memory_format=torch.channels_last)

    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return gpu_model(images.cuda().contiguous(memory_format=torch.channels_last))

    return run


def write_prediction_plots(name: str, predictions: np.ndarray, labels: torch.Tensor,
                           classes: list[str], plots_dir: Path) -> Path:
    """``actual,predicted`` rows for DVC's confusion-matrix template."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["actual", "predicted"])
    for actual, predicted in zip(labels.tolist(), predictions.tolist(), strict=True):
        writer.writerow([classes[actual], classes[predicted]])
    return fsutil.write_text(plots_dir / f"confusion_{name}.csv", buffer.getvalue())


def evaluate(p: EvaluateParams, *, seed: int, prepared_dir: Path, rows: Sequence[ModelRow],
             out_dir: Path, plots_dir: Path, pretrained_dir: Path | None = None,
             runtime: Runtime | None = None) -> EvaluateResult:
    """Score every model row and the baselines on the test split; write per-model reports,
    the comparison (``comparison.md``/``.csv``) and its intervals (``evidence.json``).

    ``pretrained_dir`` (a backbone saved without a head) adds the linear-probe baseline.
    ``runtime``: the engine's device and precision choice; float models predict there
    (:func:`.placement.prediction_placement`), ``None`` keeps everything on the CPU.
    """
    test = load_split(prepared_dir / "test.pt")
    classes = list(json.loads((prepared_dir / "meta.json").read_text())["classes"])
    shape = tuple(int(d) for d in test.images.shape[1:])
    sources = {row.source for row in rows if row.int8}
    reports: dict[str, ModelReport] = {}
    compiled_ms: dict[str, float] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        log.info("evaluate: %s%s", row.name, " (compiling int8 kernels)" if row.int8 else "")
        placement = prediction_placement("int8" if row.int8 else "float", runtime)
        if row.int8:
            program = int8_format.compile_for_cpu(int8_format.load_quantized(row.file))
            predict, cost_predict, gpu, parameters = (
                _padded(program, p.batch_size), program, None,
                reports[row.source].cost.parameters if row.source in reports else None)
        else:
            model = models.load_model(row.path).eval()
            predict, cost_predict = placement.predictor(model), _fp32_predict(model)
            gpu = predict if placement.device.type == "cuda" else _gpu_predict(model)
            parameters = models.parameter_count(model)
            if row.name in sources:
                compiled_ms[row.name] = cost_lib.cpu_latency(
                    _fp32_predict(torch.compile(model, dynamic=False)), shape,
                    threads=p.latency.threads, warmup=max(p.latency.warmup, 3),
                    iterations=p.latency.iterations).p50_ms
        reports[row.name] = evaluate_model(
            predict, test.images, test.labels, classes, p, out_dir, row.name, seed=seed,
            cost_predict=cost_predict, parameters=parameters, file=row.file, gpu_predict=gpu,
            device=placement.device)
        write_prediction_plots(row.name, reports[row.name].predictions, test.labels, classes,
                               plots_dir)
    evidence = _evidence(p, prepared_dir, pretrained_dir, rows, reports, len(classes),
                         prediction_placement("float", runtime))
    for name in evidence.not_better_than_majority:
        log.warning("evaluate: %s is not better than the majority baseline (%.2f%% vs %.2f%%)",
                    name, 100 * reports[name].accuracy,
                    100 * evidence.accuracy["majority"].estimate)
    markdown, csv_text = comparison_table(list(reports.values()), evidence)
    text = markdown + evidence.markdown() + _cost_note(rows, reports, compiled_ms, p)
    fsutil.write_text(out_dir / "comparison.md", text)
    fsutil.write_text(out_dir / "comparison.csv", csv_text)
    fsutil.write_json(out_dir / "evidence.json", evidence.to_json())
    return EvaluateResult(reports, compiled_ms, text, evidence)


def _evidence(p: EvaluateParams, prepared_dir: Path, pretrained_dir: Path | None,
              rows: Sequence[ModelRow], reports: dict[str, ModelReport],
              classes: int, placement: Placement) -> Evidence:
    """Baselines, then every interval on one shared set of bootstrap resamples."""
    data = load_prepared(prepared_dir)
    test_labels = data.test.labels.numpy()
    labeled_images = data.train.images[data.labeled]
    labeled_labels = data.train.labels[data.labeled].numpy()
    rows_ = [baselines.chance(test_labels, classes),
             baselines.majority(labeled_labels, test_labels, classes)]
    if pretrained_dir is not None:
        log.info("evaluate: linear probe on the frozen pretrained features")
        rows_.append(baselines.linear_probe(pretrained_dir, labeled_images, labeled_labels,
                                            data.val.images, data.val.labels.numpy(),
                                            data.test.images, classes, p.batch_size,
                                            placement))
    boot = Bootstrap(len(test_labels), p.bootstrap.resamples, p.bootstrap.seed,
                     p.bootstrap.level)
    comparisons = [(row.name, row.compared_to, row.step) for row in rows
                   if row.compared_to is not None and row.compared_to in reports]
    return gather(boot, test_labels, classes,
                  {name: r.predictions for name, r in reports.items()
                   if r.predictions is not None},
                  rows_, comparisons, seed=p.bootstrap.seed)


def _cost_note(rows: Sequence[ModelRow], reports: dict[str, ModelReport],
               compiled_ms: dict[str, float], p: EvaluateParams) -> str:
    """Plain sentences under the table: what each step cost (what it bought, with its
    interval, is in :meth:`Evidence.markdown`)."""
    lines = ["", f"CPU latency at batch 1 with {p.latency.threads} thread(s); fp32 rows run "
             "eagerly, int8 rows run compiled (oneDNN int8 kernels)."]
    for row in rows:
        if row.compared_to is None or row.compared_to not in reports:
            continue
        new, old = reports[row.name].cost.parameters, reports[row.compared_to].cost.parameters
        if new and old and new < old:
            lines.append(f"- {row.step}: {row.name} has {old / new:.1f}x fewer parameters "
                         f"than {row.compared_to}.")
    for row in rows:
        source = reports.get(row.source or "")
        int8_latency = reports[row.name].cost.latency
        if row.int8 and source is not None and int8_latency and source.cost.latency:
            line = (f"- {row.name}: {int8_latency.p50_ms:.2f} ms vs "
                    f"{source.cost.latency.p50_ms:.2f} ms for the eager fp32 {row.source}")
            if row.source in compiled_ms:
                line += f" and {compiled_ms[row.source]:.2f} ms compiled"
            lines.append(line + ".")
    return "\n".join(lines) + "\n"


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery evaluate``, then the
    registry gate (:mod:`refinery.stages.evaluate.registry`)."""
    from refinery import logged_models
    from refinery.formats.prepared import dataset_identity, datasets
    from refinery.stages.evaluate import registry

    declared = stage_named("evaluate")
    deployable = int8_row()
    with stage.tracked(declared, params) as run:
        runtime = make_runtime(params.engine, params.data_seed)  # the device and precision
        result = evaluate(params.evaluate, seed=params.data_seed, prepared_dir=paths.PREPARED,
                          rows=MODELS, out_dir=declared.reports,
                          plots_dir=paths.PLOTS / "evaluate", pretrained_dir=paths.PRETRAINED,
                          runtime=runtime)
        flagged = result.evidence.not_better_than_majority
        stage.finish(declared, run, result.metrics(), warnings=[
            f"{name} is not better than the majority baseline" for name in flagged])
        run.set_tags({"refinery.not_better_than_majority": ",".join(flagged) or "none"})
        test = load_split(paths.PREPARED / "test.pt")
        model_ids = logged_models.ensure_logged(run, MODELS,
                                                logged_models.example_images(test.images))
        test_set = datasets(paths.PREPARED).get("test")
        for name, values in result.metrics().items():  # on each model's page in MLflow
            if name in model_ids:
                run.log_model_metrics(values, model_ids[name], test_set)
        int8_report = result.reports[deployable.name]
        registry.register(
            run, params.registry, {"teacher": model_row("teacher"), "student": deployable},
            model_ids,
            candidate=registry.Candidate(
                accuracy=int8_report.accuracy,
                latency_p50_ms=int8_report.cost.latency.p50_ms,
                teacher_accuracy=result.reports["teacher"].accuracy,
                dataset=dataset_identity(paths.PREPARED)),
            tags={"mlflow_run_id": run.run_id},
            out_file=declared.reports / "registry.json")
        run.log_artifacts(declared.reports, "evaluation")
