"""Benchmark: the pipeline stage by stage, wall time per stage and every model's numbers.

Runs each stage as DVC runs it (``python -m refinery <stage>``) in a workspace
made from params.yaml plus a data set and overrides, then prints a wall-time
table, the evaluation's comparison and the issue's targets next to the measured
values.

    # issue 3: CPU, the default digits pipeline from pretrain through finetune
    .venv/bin/python benchmarks/pipeline.py --data digits --from pretrain --to finetune_scratch
    # issue 4: the whole pipeline on CIFAR-10 (GPU machine), 10% labels
    .venv/bin/python benchmarks/pipeline.py --data cifar
    # issue 4 on this CPU: smaller training, said so in docs/benchmarks.md
    .venv/bin/python benchmarks/pipeline.py --data cifar --set pretrain.epochs=2 ...
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml
from common import REPO, cifar_overrides, machine, make_workspace, read_json, run_stage

from refinery import paths
from refinery.pipeline import STAGES


def targets(root: Path) -> list[str]:
    """The issue's targets against what this run measured (evaluation must have run)."""
    m = read_json(root / paths.details_file("evaluate"))
    teacher, student, int8 = m["teacher"], m["student"], m["student_int8"]
    lines = [
        f"student params {student['parameters']:,.0f} vs teacher {teacher['parameters']:,.0f}: "
        f"{teacher['parameters'] / student['parameters']:.1f}x fewer (target >= 5x)",
        f"student accuracy {100 * student['accuracy']:.2f}% vs teacher "
        f"{100 * teacher['accuracy']:.2f}%: "
        f"{100 * (teacher['accuracy'] - student['accuracy']):+.2f} points (target <= 1.5)",
        f"int8 accuracy {100 * int8['accuracy']:.2f}% vs fp32 student: "
        f"{100 * (student['accuracy'] - int8['accuracy']):+.2f} points (target <= 0.5)",
        f"int8 file {int8['file_mb']:.3f} MB vs fp32 {student['file_mb']:.3f} MB: "
        f"{student['file_mb'] / int8['file_mb']:.2f}x smaller (target >= 3.5x)",
        f"batch-1 p50: int8 {int8['latency_p50_ms']:.2f} ms, fp32 student eager "
        f"{student['latency_p50_ms']:.2f} ms "
        f"({student['latency_p50_ms'] / int8['latency_p50_ms']:.2f}x, target >= 1.5x), "
        "fp32 student compiled "
        f"{student.get('latency_p50_ms_compiled', float('nan')):.2f} ms, fp32 teacher "
        f"{teacher['latency_p50_ms']:.2f} ms "
        f"({teacher['latency_p50_ms'] / int8['latency_p50_ms']:.1f}x, target >= 5x)",
        f"teacher {100 * teacher['accuracy']:.2f}% vs scratch baseline "
        f"{100 * m['scratch']['accuracy']:.2f}% on the same labels (CIFAR GPU target: "
        "teacher >= 85%)",
    ]
    return lines


def run(root: Path, overrides: dict[str, object], *, first: str = "download",
        last: str = "evaluate", fresh: bool = False) -> dict[str, float]:
    """Run the stages ``first``..``last`` in a workspace ``root`` made from params.yaml plus
    ``overrides``; wall seconds per stage, and ``total``."""
    if fresh and root.exists():
        shutil.rmtree(root)
    make_workspace(root, overrides)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root.resolve() / 'mlflow.db'}"}
    names = [stage.name for stage in STAGES]
    selected = STAGES[names.index(first):names.index(last) + 1]
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for stage in selected:
        timings[stage.name] = run_stage(root, stage.cli, *stage.cli_args, env=env)
        print(f"[{stage.name}] {timings[stage.name]:.1f} s", flush=True)
    timings["total"] = time.perf_counter() - started
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks/.work/pipeline")
    parser.add_argument("--data", choices=["digits", "cifar"], default="digits")
    parser.add_argument("--archive", type=Path, default=None,
                        help="a CIFAR-10 JPEG archive (default: the shared full one)")
    parser.add_argument("--from", dest="first", default="download")
    parser.add_argument("--to", dest="last", default="evaluate")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh", action="store_true", help="delete the workspace first")
    args = parser.parse_args()

    from refinery.profiles import parse_assignments

    root = args.workdir / args.data
    overrides = {}
    if args.data == "cifar":
        overrides = cifar_overrides(args.archive) if args.archive else cifar_overrides()
    overrides.update(parse_assignments(args.set))
    timings = run(root, overrides, first=args.first, last=args.last, fresh=args.fresh)
    total = timings.pop("total")

    print(f"\nmachine: {machine()}")
    print(f"data: {args.data}; overrides: {yaml.safe_dump(parse_assignments(args.set)).strip()}")
    print(f"{'stage':<18} {'wall s':>8}")
    for name, seconds in timings.items():
        print(f"{name:<18} {seconds:8.1f}")
    print(f"{'total':<18} {total:8.1f}")
    for name in timings:
        path = root / paths.details_file(name)
        if name in ("pretrain", "finetune", "finetune_scratch", "distill", "quantize"):
            m = read_json(path)
            shown = {k: round(v, 4) for k, v in m.items()
                     if k in ("knn_acc", "val_acc", "int8_val_acc", "fp32_val_acc",
                              "pairs_per_second", "images_per_second", "size_reduction")}
            print(f"  {name}: {shown}")
    if "evaluate" in timings:
        print()
        print((root / "reports/evaluate/comparison.md").read_text())
        print("targets:")
        for line in targets(root):
            print(f"  - {line}")


if __name__ == "__main__":
    main()
