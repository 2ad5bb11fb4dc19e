"""The ``evaluate`` stage: every model the pipeline made, scored the same way on test.

Rows: the supervised-from-scratch baseline, the fine-tuned teacher, the
distilled student (fp32) and the int8 student. Each gets accuracy, macro
P/R/F1, calibration, robustness to corruptions and its cost. Costs are stated
as measured: fp32 models run eagerly (as ``load_model`` gives them), the int8
model runs compiled to oneDNN int8 kernels (what it is for); the fp32 student
is also timed compiled, so the int8 speed-up is not flattered by comparing a
compiled model with an eager one.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from refinery import fsutil, models, paths, stage
from refinery.formats import int8 as int8_format
from refinery.formats.prepared import load_split
from refinery.params import EvaluateParams, Params
from refinery.pipeline import stage_named
from refinery.stages.evaluate import cost as cost_lib
from refinery.stages.evaluate.report import ModelReport, comparison_table, evaluate_model

log = logging.getLogger(__name__)

#: Row name -> (what it is) in the order of the comparison table.
MODEL_ROWS = {
    "scratch": "ResNet teacher architecture trained from scratch on the labeled subset",
    "teacher": "SimCLR-pretrained backbone fine-tuned on the labeled subset",
    "student": "small student distilled from the teacher (fp32)",
    "student_int8": "the student, int8 static quantization (compiled oneDNN kernels)",
}


@dataclass
class EvaluateResult:
    reports: dict[str, ModelReport]
    student_compiled_latency_ms: float | None
    table_markdown: str

    def metrics(self) -> dict[str, dict[str, float]]:
        """Nested per model, the form ``dvc metrics`` shows side by side."""
        out = {name: report.metrics() for name, report in self.reports.items()}
        if self.student_compiled_latency_ms is not None:
            out["student"]["latency_p50_ms_compiled"] = self.student_compiled_latency_ms
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


def write_prediction_plots(name: str, logits: torch.Tensor, labels: torch.Tensor,
                           classes: list[str], plots_dir: Path) -> Path:
    """``actual,predicted`` rows for DVC's confusion-matrix template."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["actual", "predicted"])
    for actual, predicted in zip(labels.tolist(), logits.argmax(dim=1).tolist(), strict=True):
        writer.writerow([classes[actual], classes[predicted]])
    return fsutil.write_text(plots_dir / f"confusion_{name}.csv", buffer.getvalue())


def evaluate(p: EvaluateParams, *, seed: int, prepared_dir: Path, model_dirs: dict[str, Path],
             int8_path: Path, out_dir: Path, plots_dir: Path) -> EvaluateResult:
    """Score every model on the test split; write per-model reports and the comparison."""
    from refinery.stages.evaluate.report import predict_logits

    meta_classes = models.load_config(model_dirs["teacher"]).classes
    test = load_split(prepared_dir / "test.pt")
    classes = list(meta_classes)
    reports: dict[str, ModelReport] = {}
    compiled_student_ms = None
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("scratch", "teacher", "student"):
        model = models.load_model(model_dirs[name]).eval()
        predict = _fp32_predict(model)
        log.info("evaluate: %s", name)
        reports[name] = evaluate_model(
            predict, test.images, test.labels, classes, p, out_dir, name, seed=seed,
            cost_predict=predict, parameters=models.parameter_count(model),
            file=model_dirs[name] / "model.pt", gpu_predict=_gpu_predict(model))
        write_prediction_plots(name, predict_logits(predict, test.images, p.batch_size),
                               test.labels, classes, plots_dir)
        if name == "student":
            compiled = torch.compile(model, dynamic=False)
            shape = tuple(int(d) for d in test.images.shape[1:])
            compiled_student_ms = cost_lib.cpu_latency(
                _fp32_predict(compiled), shape, threads=p.latency.threads,
                warmup=max(p.latency.warmup, 3), iterations=p.latency.iterations).p50_ms
    int8 = int8_format.compile_for_cpu(int8_format.load_quantized(int8_path))
    predict = _padded(int8, p.batch_size)
    log.info("evaluate: student_int8 (compiling int8 kernels)")
    reports["student_int8"] = evaluate_model(
        predict, test.images, test.labels, classes, p, out_dir, "student_int8", seed=seed,
        cost_predict=int8, parameters=reports["student"].cost.parameters, file=int8_path)
    write_prediction_plots("student_int8", predict_logits(predict, test.images, p.batch_size),
                           test.labels, classes, plots_dir)
    markdown, csv_text = comparison_table(list(reports.values()))
    note = _cost_note(reports, compiled_student_ms, p)
    fsutil.write_text(out_dir / "comparison.md", markdown + "\n" + note)
    fsutil.write_text(out_dir / "comparison.csv", csv_text)
    return EvaluateResult(reports, compiled_student_ms, markdown + "\n" + note)


def _ratio(reports: dict[str, ModelReport], big: str, small: str) -> str:
    a, b = reports[big].cost.parameters, reports[small].cost.parameters
    return f"{a / b:.0f}" if a and b else "?"


def _cost_note(reports: dict[str, ModelReport], compiled_student_ms: float | None,
               p: EvaluateParams) -> str:
    """Plain sentences under the table: what each step cost and bought."""
    acc = {name: r.accuracy for name, r in reports.items()}
    lines = [
        "",
        f"CPU latency at batch 1 with {p.latency.threads} thread(s); fp32 rows run eagerly, "
        "the int8 row runs compiled (oneDNN int8 kernels).",
        f"- Pretraining: teacher minus scratch = {100 * (acc['teacher'] - acc['scratch']):+.1f} "
        "accuracy points (same network, same labels).",
        f"- Distillation: student minus teacher = {100 * (acc['student'] - acc['teacher']):+.1f} "
        f"points, with {_ratio(reports, 'teacher', 'student')}x fewer parameters.",
        f"- Quantization: int8 minus fp32 student = "
        f"{100 * (acc['student_int8'] - acc['student']):+.1f} points.",
    ]
    int8_latency = reports["student_int8"].cost.latency
    fp32_latency = reports["student"].cost.latency
    if int8_latency and fp32_latency:
        line = (f"- int8 student: {int8_latency.p50_ms:.2f} ms vs {fp32_latency.p50_ms:.2f} ms "
                "for the eager fp32 student")
        if compiled_student_ms is not None:
            line += f" and {compiled_student_ms:.2f} ms for the compiled fp32 student"
        lines.append(line + ".")
    return "\n".join(lines) + "\n"


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery evaluate``, then the
    registry gate (:mod:`refinery.stages.evaluate.registry`)."""
    from refinery.formats.prepared import dataset_identity
    from refinery.stages.evaluate import registry

    declared = stage_named("evaluate")
    int8 = paths.STUDENT_INT8 / "model.pt2"
    with stage.tracked(declared, params) as run:
        result = evaluate(
            params.evaluate, seed=params.seed, prepared_dir=paths.PREPARED,
            model_dirs={"scratch": paths.SCRATCH, "teacher": paths.TEACHER,
                        "student": paths.STUDENT},
            int8_path=int8, out_dir=declared.reports, plots_dir=paths.PLOTS / "evaluate")
        stage.finish(declared, run, result.metrics())
        test = load_split(paths.PREPARED / "test.pt")
        int8_report = result.reports["student_int8"]
        registry.register(
            run, params.registry, models.load_model(paths.TEACHER), int8,
            example=(test.images[:2].float() / 255).numpy(),
            candidate=registry.Candidate(
                accuracy=int8_report.accuracy,
                latency_p50_ms=int8_report.cost.latency.p50_ms,
                teacher_accuracy=result.reports["teacher"].accuracy,
                dataset=dataset_identity(paths.PREPARED)),
            tags={"mlflow_run_id": run.run_id},
            out_file=declared.reports / "registry.json")
        run.log_artifacts(declared.reports, "evaluation")
