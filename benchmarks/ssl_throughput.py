"""Benchmark: self-supervised pretraining throughput (image pairs per second).

Runs the real ``pretrain`` stage (SimCLR, ResNet-18, 32x32 CIFAR-10 from the
shared archive) for a few epochs and prints the pairs/s of every epoch, all
augmentation included (two views per image, batched on the device). Target
(issue 3, one H100): >= 18,000 pairs/s sustained over an epoch; a plain
two-view DataLoader with per-image PIL transforms and 14 workers delivers
about 4,400 (``--reference`` measures that loader here).

    .venv/bin/python benchmarks/ssl_throughput.py [--epochs 3] [--batch 512] [--no-compile]
    .venv/bin/python benchmarks/ssl_throughput.py --data digits --epochs 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from common import REPO, cifar_overrides, machine, make_workspace, read_json, run_stage

from refinery import paths


def prepare_data(root: Path, env: dict[str, str]) -> None:
    if (root / "data/augment/policies.json").exists():
        return
    for stage in ("download", "validate", "prepare", "augment"):
        print(f"[data] {stage}: {run_stage(root, stage, env=env):.1f} s", flush=True)


def reference_loader(root: Path, workers: int, batch: int, batches: int) -> float:
    """Pairs/s of a classic two-view loader: PIL images, per-image v2 transforms, workers."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from refinery.formats.prepared import load_split

    images = load_split(root / "data/prepared/train.pt").images
    view = v2.Compose([
        v2.RandomResizedCrop(32, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])

    class TwoViews(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return images.shape[0]

        def __getitem__(self, index: int):
            picture = Image.fromarray(images[index].permute(1, 2, 0).numpy())
            return view(picture), view(picture)

    loader = torch.utils.data.DataLoader(TwoViews(), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         pin_memory=torch.cuda.is_available(),
                                         persistent_workers=workers > 0)
    iterator = iter(loader)
    next(iterator)  # start-up of the workers is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def measure(root: Path, *, data: str = "cifar", epochs: int = 3, batch: int = 512,
            compile_: bool | str = "auto", archive: Path | None = None,
            extra: dict[str, object] | None = None) -> dict[str, object]:
    """Run the pretrain stage in ``root``; its per-epoch pairs/s and the run's figures.

    Throughput excludes the untimed warm-up steps (compile, autotune), reported apart.
    """
    overrides = (cifar_overrides(archive) if archive else cifar_overrides()) \
        if data == "cifar" else {}
    overrides.update({"pretrain.epochs": epochs, "pretrain.batch_size": batch,
                      "pretrain.min_steps": 0,
                      "pretrain.knn_every": 1000, "engine.compile": compile_,
                      "engine.checkpoint_every_minutes": 0, "engine.log_every_steps": 50,
                      **(extra or {})})
    make_workspace(root, overrides)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root.resolve() / 'mlflow.db'}"}
    prepare_data(root, env)
    wall = run_stage(root, "pretrain", env=env)
    with open(root / "plots/pretrain.csv") as fh:
        history = list(csv.DictReader(fh))
    metrics = read_json(root / paths.details_file("pretrain"))
    return {"history": history, "wall_s": wall, "pairs_per_s": metrics["pairs_per_second"],
            "train_s": metrics["train_seconds"],
            "warmup_s": metrics.get("warmup_seconds", float("nan")),
            "knn_acc": metrics.get("knn_acc", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks/.work/ssl")
    parser.add_argument("--data", choices=["cifar", "digits"], default="cifar")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true",
                        help="eager (default: engine.compile auto, on with CUDA)")
    parser.add_argument("--reference", action="store_true", help="also time a PIL DataLoader")
    parser.add_argument("--workers", type=int, default=14)
    args = parser.parse_args()

    root = args.workdir / args.data
    result = measure(root, data=args.data, epochs=args.epochs, batch=args.batch,
                     compile_=False if args.no_compile else "auto")
    history = result["history"]
    print(f"\nmachine: {machine()}")
    print(f"SimCLR pretraining, ResNet-18, {args.data}, global batch {args.batch}, "
          f"compile={'off' if args.no_compile else 'auto'}")
    print(f"{'epoch':>5} {'pairs/s':>10} {'loss':>8}")
    for row in history:
        print(f"{row['epoch']:>5} {float(row['samples_per_second']):10.0f} "
              f"{float(row['train_loss']):8.4f}")
    print(f"over the run: {result['pairs_per_s']:.0f} pairs/s (warm-up, {result['warmup_s']:.1f} s "
          f"of compile and autotune, not counted); stage wall {result['wall_s']:.1f} s, "
          f"training {result['train_s']:.1f} s (target >= 18,000 pairs/s on one H100)")
    if args.reference:
        rate = reference_loader(root, args.workers, args.batch, batches=20)
        print(f"reference two-view PIL DataLoader, {args.workers} workers: {rate:.0f} pairs/s "
              "(loading and augmenting only, no model)")


if __name__ == "__main__":
    main()
