"""CPU cost of the fp32 teacher, the fp32 student and the int8 student (32x32 RGB).

    python benchmarks/quantize_cpu.py                  # default student, 1 thread
    python benchmarks/quantize_cpu.py --threads 2 --sweep --json out.json

Models are randomly initialized (cost does not depend on the weights; accuracy
comes from the pipeline). The int8 student goes the pipeline's way: PTQ on
random calibration images, saved as ``.pt2``, loaded back, ``torch.compile``d.
File sizes are the pipeline's artifacts: ``model.pt`` (fp32 state dict) and
the ``.pt2``. Latency is batch 1 (p50/p95 over ``--iterations`` calls),
throughput is batch ``--batch``; every number is measured with
``torch.set_num_threads(--threads)``. The load average is printed because the
machine may be shared: numbers taken under load are slower and noisier, which
is why the main table takes the median of ``--repeats`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from refinery.models import ModelConfig, build_model, save_model
from refinery.params import StudentParams
from refinery.stages import quantize
from refinery.stages.evaluate.cost import cpu_latency, cpu_throughput, file_size_mb, parameter_count

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
SHAPE = (3, 32, 32)
SWEEP = [(w, d) for w in (16, 24, 32) for d in ((1, 1, 1), (1, 1, 2), (2, 2, 2))]


def _config(arch: str, width: int = 32, depth: tuple[int, ...] = (1, 1, 1)) -> ModelConfig:
    return ModelConfig(arch=arch, in_channels=3, image_size=32, num_classes=10, mean=CIFAR_MEAN,
                       std=CIFAR_STD, width=width, depth=depth)


@dataclass
class Candidate:
    name: str
    predict: Callable[[torch.Tensor], torch.Tensor]
    params: int
    file: Path
    compile_s: float | None = None


@dataclass
class Row:
    model: str
    params: int
    file_mb: float
    p50_ms: float
    p95_ms: float
    cpu_p50_ms: float
    images_per_s: float
    threads: int
    compile_s: float | None = None


def _measure_all(candidates: list[Candidate], args: argparse.Namespace) -> list[Row]:
    """Measure every model ``--repeats`` times, interleaved, and keep the median of each figure.

    Interleaving spreads a burst of load from other processes over all models
    instead of penalizing whichever one happened to run during it.
    """
    runs: dict[str, list[tuple[float, float, float, float]]] = {c.name: [] for c in candidates}
    for repeat in range(args.repeats):
        for c in candidates:
            latency = cpu_latency(c.predict, SHAPE, threads=args.threads, warmup=args.warmup,
                                  iterations=args.iterations)
            throughput = cpu_throughput(c.predict, SHAPE, threads=args.threads, batch=args.batch,
                                        iterations=args.throughput_iterations)
            runs[c.name].append((latency.p50_ms, latency.p95_ms, latency.cpu_p50_ms,
                                 throughput.images_per_s))
            print(f"  [{repeat + 1}/{args.repeats}] {c.name}: p50 {latency.p50_ms:.2f} ms, "
                  f"{throughput.images_per_s:.0f} img/s", flush=True)
    rows = []
    for c in candidates:
        p50, p95, cpu, rate = (statistics.median(v) for v in zip(*runs[c.name], strict=True))
        rows.append(Row(c.name, c.params, file_size_mb(c.file), p50, p95, cpu, rate,
                        args.threads, c.compile_s))
    return rows


def _compiled(module: torch.nn.Module, args: argparse.Namespace
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """Compile, then trigger the compiles of both measured batch sizes (timed together)."""
    predict = quantize.compile_for_cpu(module)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in (1, args.batch):
            predict(torch.rand(batch, *SHAPE))
    return predict, time.perf_counter() - start


def _int8(student: torch.nn.Module, root: Path, args: argparse.Namespace
          ) -> tuple[torch.nn.Module, Path, float]:
    calibration = torch.rand(args.calibration, *SHAPE, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    program = quantize.quantize_ptq(student, calibration, batch_size=64)
    seconds = time.perf_counter() - start
    path = quantize.save_quantized(program, root / "student-int8.pt2")
    return quantize.load_quantized(path), path, seconds


def main_rows(args: argparse.Namespace, root: Path) -> list[Row]:
    default = StudentParams()
    teacher = build_model(_config("resnet18")).eval()
    student = build_model(_config("student", default.width, default.depth)).eval()
    teacher_file = save_model(teacher, root / "teacher") / "model.pt"
    student_file = save_model(student, root / "student") / "model.pt"
    n_student = parameter_count(student)
    fp32_compiled, fp32_compile_s = _compiled(student, args)
    int8, int8_file, ptq_s = _int8(student, root, args)
    print(f"  PTQ (export, prepare, calibrate {args.calibration}, convert, re-export): "
          f"{ptq_s:.1f} s", flush=True)
    int8_compiled, int8_compile_s = _compiled(int8, args)
    print(f"  compile (batch 1 and {args.batch}): fp32 {fp32_compile_s:.1f} s, "
          f"int8 {int8_compile_s:.1f} s", flush=True)
    return _measure_all([
        Candidate("fp32 teacher (resnet18, eager)", teacher, parameter_count(teacher),
                  teacher_file),
        Candidate(f"fp32 student w{default.width} d{list(default.depth)} (eager)", student,
                  n_student, student_file),
        Candidate("fp32 student (compiled)", fp32_compiled, n_student, student_file,
                  fp32_compile_s),
        Candidate("int8 student (uncompiled q/dq graph)", int8, n_student, int8_file),
        Candidate("int8 student (compiled)", int8_compiled, n_student, int8_file,
                  int8_compile_s),
    ], args)


def sweep_rows(args: argparse.Namespace, root: Path) -> list[dict[str, object]]:
    out = []
    for width, depth in SWEEP:
        student = build_model(_config("student", width, depth)).eval()
        folder = root / f"w{width}-d{''.join(map(str, depth))}"
        fp32_file = save_model(student, folder) / "model.pt"
        int8, int8_file, _ = _int8(student, folder, args)
        int8_predict, _ = _compiled(int8, args)
        fp32 = cpu_latency(student, SHAPE, threads=args.threads, warmup=args.warmup,
                           iterations=args.iterations)
        fast = cpu_latency(int8_predict, SHAPE, threads=args.threads, warmup=args.warmup,
                           iterations=args.iterations)
        rate = cpu_throughput(int8_predict, SHAPE, threads=args.threads, batch=args.batch,
                              iterations=args.throughput_iterations)
        row = {"width": width, "depth": list(depth), "params": parameter_count(student),
               "fp32_mb": file_size_mb(fp32_file), "int8_mb": file_size_mb(int8_file),
               "fp32_p50_ms": fp32.p50_ms, "int8_p50_ms": fast.p50_ms,
               "int8_p95_ms": fast.p95_ms, "fp32_cpu_p50_ms": fp32.cpu_p50_ms,
               "int8_cpu_p50_ms": fast.cpu_p50_ms, "int8_images_per_s": rate.images_per_s}
        print(f"  w{width} d{list(depth)}: {row['params']:,} params, "
              f"int8 p50 {fast.p50_ms:.2f} ms", flush=True)
        out.append(row)
    return out


def _print_main(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\n| model | params | file MB | p50 ms (b1) | p95 ms (b1) | CPU-time p50 ms "
          f"| img/s (b{args.batch}) | threads | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        compile_s = "–" if r.compile_s is None else f"{r.compile_s:.1f}"
        print(f"| {r.model} | {r.params:,} | {r.file_mb:.3f} | {r.p50_ms:.2f} | {r.p95_ms:.2f} "
              f"| {r.cpu_p50_ms:.2f} | {r.images_per_s:,.0f} | {r.threads} | {compile_s} |")
    teacher, student, student_c, _, int8 = rows
    print(f"\nint8 vs fp32 student: {student.file_mb / int8.file_mb:.2f}x smaller file, "
          f"{student.p50_ms / int8.p50_ms:.2f}x faster p50 than eager "
          f"({student_c.p50_ms / int8.p50_ms:.2f}x vs compiled fp32), "
          f"{int8.images_per_s / student.images_per_s:.2f}x throughput")
    print(f"int8 student vs fp32 teacher: {teacher.p50_ms / int8.p50_ms:.1f}x faster p50, "
          f"{teacher.params / int8.params:.1f}x fewer params, "
          f"{int8.images_per_s / teacher.images_per_s:.1f}x throughput")


def _print_sweep(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(f"\n| width | depth | params | fp32 MB | int8 MB | fp32 p50 ms | int8 p50 ms "
          f"| int8 p95 ms | fp32 / int8 CPU-time p50 ms | int8 img/s (b{args.batch}) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['width']} | {r['depth']} | {r['params']:,} | {r['fp32_mb']:.3f} "
              f"| {r['int8_mb']:.3f} | {r['fp32_p50_ms']:.2f} | {r['int8_p50_ms']:.2f} "
              f"| {r['int8_p95_ms']:.2f} | {r['fp32_cpu_p50_ms']:.2f} / {r['int8_cpu_p50_ms']:.2f} "
              f"| {r['int8_images_per_s']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--throughput-iterations", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved measurement rounds; medians are reported")
    parser.add_argument("--sweep", action="store_true", help="also time student sizes")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s), "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = main_rows(args, Path(tmp))
        sweep = sweep_rows(args, Path(tmp)) if args.sweep else []
    print(f"load average after {os.getloadavg()[0]:.2f}")
    _print_main(rows, args)
    if sweep:
        _print_sweep(sweep, args)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "main": [asdict(r) for r in rows],
                                         "sweep": sweep}, indent=2) + "\n")


if __name__ == "__main__":
    main()
