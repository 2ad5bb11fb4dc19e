"""Benchmark suite: every GPU figure of issue 11 in one command, on one GPU.

From the CIFAR-10 JPEG archive (``shared/datasets/cifar10-jpeg.tar.gz``), with the
existing benchmarks doing the work:

- SSL pretraining throughput: ResNet-18, 32 px, global batch 512, pairs/s over the
  timed epochs (``ssl_throughput.py``; compile and autotune happen in untimed
  warm-up steps, reported apart);
- supervised throughput and time to 93.3% (and 90.4%) test accuracy: ResNet-18 from
  scratch on all labels with the time-to-accuracy recipe (``time_to_accuracy.py``);
- the evaluate stage's wall time on its models (scratch baseline, teacher, student,
  pruned student, int8 student), after a short pipeline that trains them one epoch each
  (cost figures do not depend on how well the models were trained);
- with ``--pipeline``: the whole pipeline with the cifar10 profile instead of the
  short one (``pipeline.py``): its wall time and the teacher's test accuracy.

Prints a table and writes ``docs/results/gpu_suite.json``. Without a CUDA device it
refuses to run: that file holds GPU figures only. ``--smoke`` runs every part tiny on
the CPU (digits) and writes to a temporary file, to show the script works.

    .venv/bin/python benchmarks/gpu_suite.py                  # one GPU
    .venv/bin/python benchmarks/gpu_suite.py --pipeline       # + the cifar10 pipeline
    .venv/bin/python benchmarks/gpu_suite.py --smoke          # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pipeline
import ssl_throughput
import time_to_accuracy
from common import REPO, SHARED_CIFAR, cifar_overrides, commit_id, read_json, write_result

from refinery import paths
from refinery.pipeline import MODELS

RESULT = REPO / "docs" / "results" / "gpu_suite.json"
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"

#: Data and augmentation shared by the SSL and the time-to-accuracy runs, so both use one
#: workspace and the data stages run once (time-to-accuracy trains on every label).
CIFAR_DATA = {"prepare.label_fraction": 1.0, "augment.supervised.crop": "translate",
              "augment.supervised.translate_px": 2, "augment.supervised.flip": True}

#: The short pipeline that gives evaluate its four models: one epoch per training stage,
#: eager (compiling four stages would cost more than they train).
SHORT = {"pretrain.epochs": 1, "pretrain.min_steps": 0, "finetune.epochs": 1,
         "finetune.min_steps": 0, "distill.epochs": 1, "distill.min_steps": 0,
         "prune.epochs": 1, "prune.min_steps": 0, "engine.compile": False}


def default_archive() -> Path:
    """``shared/`` inside the repository (the GPU machine), else beside it (this box)."""
    inside = REPO / "shared" / "datasets" / ARCHIVE_NAME
    return inside if inside.exists() else SHARED_CIFAR


def settings(smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    if smoke:  # digits, a few steps each: the code paths, not figures
        return {"data": "digits", "ssl_epochs": 1, "ssl_batch": 64, "tta_epochs": 2,
                "tta_batch": 64, "tta_lr": 0.05}
    return {"data": "cifar", "ssl_epochs": args.ssl_epochs, "ssl_batch": 512,
            "tta_epochs": args.tta_epochs, "tta_batch": 512, "tta_lr": 0.2}


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    s = settings(args.smoke, args)
    cifar = s["data"] == "cifar"
    work = args.workdir / ("smoke" if args.smoke else "gpu")
    archive = args.archive if cifar else None
    data = CIFAR_DATA if cifar else {"prepare.label_fraction": 1.0}

    print("== SSL pretraining throughput", flush=True)
    ssl = ssl_throughput.measure(work / "train", data=s["data"], epochs=s["ssl_epochs"],
                                 batch=s["ssl_batch"], archive=archive,
                                 extra={**data, "pretrain.knn_every": 1000})
    print("== supervised time to accuracy", flush=True)
    tta = time_to_accuracy.measure(work / "train", data=s["data"], epochs=s["tta_epochs"],
                                   batch=s["tta_batch"], lr=s["tta_lr"], archive=archive,
                                   extra=data)
    reached = tta["reached"]

    base = cifar_overrides(archive) if cifar else {}
    if args.pipeline:
        print("== whole pipeline (cifar10 profile)" if cifar else "== whole pipeline", flush=True)
        root, overrides = work / "pipeline", base
    else:
        print("== short pipeline for evaluate's four models", flush=True)
        root, overrides = work / "short", {**base, **SHORT}
    timings = pipeline.run(root, overrides, fresh=True)
    evaluation = read_json(root / paths.details_file("evaluate"))
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit_id(),
        "smoke": args.smoke,
        "data": s["data"],
        "ssl_pairs_per_s": ssl["pairs_per_s"],
        "ssl_warmup_s": ssl["warmup_s"],
        "supervised_img_per_s": tta["img_per_s"],
        "supervised_warmup_s": tta["warmup_s"],
        "time_to_90_4_s": reached.get(0.904),
        "time_to_93_3_s": reached.get(0.933),
        "tta_final_test_acc": tta["final_test_acc"],
        "evaluate_s": timings["evaluate"],
        "evaluate_models": [row.name for row in MODELS if row.name in evaluation],
        "settings": s,
    }
    if args.pipeline:
        figures["pipeline_s"] = timings["total"]
        figures["teacher_acc"] = evaluation["teacher"]["accuracy"]
    figures["suite_s"] = time.perf_counter() - started
    return figures


def table(f: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        value = f.get(key)
        return "not reached" if value is None and key.startswith("time_to") else (
            "-" if value is None else format(value, fmt))

    rows = [
        ("device", f["device"] + (" (SMOKE: not figures)" if f["smoke"] else "")),
        ("torch / commit", f"{f['torch']} / {f['commit']}"),
        ("SSL pairs/s (timed epochs)", num("ssl_pairs_per_s", ",.0f")),
        ("  SSL warm-up s (compile, autotune)", num("ssl_warmup_s", ".1f")),
        ("supervised img/s", num("supervised_img_per_s", ",.0f")),
        ("  supervised warm-up s", num("supervised_warmup_s", ".1f")),
        ("time to 90.4% s (training only)", num("time_to_90_4_s", ".1f")),
        ("time to 93.3% s (training only)", num("time_to_93_3_s", ".1f")),
        (f"evaluate stage s ({len(f['evaluate_models'])} models)", num("evaluate_s", ".1f")),
        ("pipeline s (--pipeline)", num("pipeline_s", ".1f")),
        ("teacher test acc (--pipeline)", num("teacher_acc", ".4f")),
        ("suite wall s", num("suite_s", ".1f")),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=default_archive(),
                        help="CIFAR-10 JPEG image-folder archive (default: shared/datasets/"
                        f"{ARCHIVE_NAME} in the repository, else beside it)")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks/.work/gpu_suite")
    parser.add_argument("--ssl-epochs", type=int, default=2)
    parser.add_argument("--tta-epochs", type=int, default=30)
    parser.add_argument("--pipeline", action="store_true",
                        help="the whole cifar10 pipeline (pipeline_s, teacher_acc) instead "
                        "of the short one that only feeds evaluate")
    parser.add_argument("--smoke", action="store_true",
                        help="every part tiny on the CPU (digits); writes a temporary file")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where the JSON goes (default: {RESULT.relative_to(REPO)}; "
                        "with --smoke a temporary file)")
    args = parser.parse_args()

    import torch

    if args.smoke:
        if args.out is not None and args.out.resolve() == RESULT.resolve():
            sys.exit(f"gpu_suite: --smoke figures never go to {RESULT.relative_to(REPO)}")
        out = args.out or Path(tempfile.mkdtemp(prefix="gpu_suite_smoke_")) / "gpu_suite.json"
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_suite: no CUDA device here; refusing to measure "
                     f"({RESULT.relative_to(REPO)} holds GPU figures only). "
                     "--smoke runs every part tiny on the CPU.")
        if not args.archive.exists():
            sys.exit(f"gpu_suite: no archive at {args.archive} (see --archive)")
        out = args.out or RESULT
    figures = run_suite(args)
    print()
    print(table(figures))
    if args.smoke:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
    else:
        out = write_result("gpu_suite", figures, path=out)
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
