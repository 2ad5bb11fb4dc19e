"""Throughput of the augmentation policies on one batch: images/s (SSL: view pairs/s).

    python benchmarks/augment_throughput.py                 # CPU here, CUDA when present
    python benchmarks/augment_throughput.py --device cuda --batch 512 --compile

Times ``sample`` (all random draws, on a generator on the same device) plus
``apply`` on a uint8 batch already on the device, synchronizing the device
around each timed call. The numbers it prints are measured, nothing else.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from refinery.params import AugmentParams, SslAugParams, SupervisedAugParams
from refinery.stages.augment import resolve

POLICIES: dict[str, AugmentParams] = {
    "supervised: translate 4 (reflect) + flip": AugmentParams(
        supervised=SupervisedAugParams(crop="translate", translate_px=4, flip=True)),
    "supervised: + RandAugment(2, 9) + erasing + mixup/cutmix": AugmentParams(
        supervised=SupervisedAugParams(crop="translate", translate_px=4, flip=True,
                                       auto="randaugment", erasing_p=0.25, mixup_alpha=0.2,
                                       cutmix_alpha=1.0)),
    "supervised: resized crop + flip + TrivialAugmentWide": AugmentParams(
        supervised=SupervisedAugParams(crop="resized", resized_scale=(0.35, 1.0), flip=True,
                                       auto="trivialaugment")),
}
SSL_POLICIES: dict[str, AugmentParams] = {
    "ssl two views: crop, flip, jitter 0.8, gray 0.2": AugmentParams(
        ssl=SslAugParams(flip=True)),
    "ssl two views: + blur 0.5": AugmentParams(ssl=SslAugParams(flip=True, blur_p=0.5)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds per call after warm-up.

    The CPU time is this process's own: on a shared machine it moves less than the
    wall time when other processes compete for the cores.
    """
    for _ in range(3):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def _report(title: str, batch: int, unit: str, wall: float, cpu: float) -> None:
    rate = f"{batch / wall:>10,.0f} {unit}/s"
    print(f"  {title:58s} {rate:19s} ({wall * 1e3:7.2f} ms/batch wall, "
          f"{cpu * 1e3:7.2f} ms process CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each apply")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    meta = {"size": args.size, "channels": args.channels, "classes": [str(i) for i in range(10)],
            "mean": [0.5] * args.channels}
    data = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, args.channels, args.size, args.size),
                           generator=data, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=data).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"batch {args.batch} x {args.channels}x{args.size}x{args.size} uint8 on {where}"
          f"{', compiled' if args.compile else ''}; median of {args.repeats}")

    def maybe_compile(fn: Callable) -> Callable:
        return torch.compile(fn, dynamic=False) if args.compile else fn

    for title, params in POLICIES.items():
        policy, _ = resolve(params, meta)
        apply = maybe_compile(policy.apply)

        def step(policy=policy, apply=apply) -> object:
            p = policy.sample(args.batch, generator, device)
            return policy.mix(apply(images, p), labels, p)

        _report(title, args.batch, "images", *_time(step, device, args.repeats))
    for title, params in SSL_POLICIES.items():
        _, policy = resolve(params, meta)
        apply = maybe_compile(policy.apply)

        def step(policy=policy, apply=apply) -> object:
            return apply(images, policy.sample(args.batch, generator, device))

        _report(title, args.batch, "pairs", *_time(step, device, args.repeats))


if __name__ == "__main__":
    main()
