"""Benchmark: download (file://), validate and prepare the full shared CIFAR-10 archive.

Prints seconds (wall and CPU, workers included) per stage and peak memory
(this process and its decode workers).
Target (issue 2): all three stages under 30 s and 2 GiB on the 2-core CI machine.

    .venv/bin/python benchmarks/data_stages.py [--archive PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
SHA256 = "a20f75dab73b9c5c6f54e35c84da477e385f34a4615399fdbaef48b0e1e1c437"


def peak_mib() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child (MiB).

    This process's figure restarts at each stage (:func:`stage_peak_mib`).
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def stage_peak_mib() -> float | None:
    """Peak resident memory of this process since the last call (Linux; None elsewhere).

    Reads ``VmHWM`` and then resets it through ``/proc/self/clear_refs``, so each
    stage's own peak is reported, not the largest so far.
    """
    try:
        status = Path("/proc/self/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("VmHWM:"))
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, StopIteration, ValueError):
        return None
    return peak / 1024


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (pool workers) so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    args = parser.parse_args()
    from refinery.params import apply_overrides, flatten, parse_params
    from refinery.profiles import profile_path
    from refinery.stages.download import download
    from refinery.stages.prepare import prepare
    from refinery.stages.validate import validate

    overrides = flatten(yaml.safe_load(profile_path("cifar10").read_text()))
    overrides.update({"download.source": "image-folder",
                      "download.url": args.archive.resolve().as_uri(),
                      "download.checksum": f"sha256:{SHA256}"})
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = parse_params(apply_overrides(raw, overrides))
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    worker_peaks: dict[str, float] = {}  # largest finished child so far (it only grows)
    load_before = os.getloadavg()[0]
    stage_peak_mib()
    with tempfile.TemporaryDirectory(prefix="refinery-bench-") as tmp:
        root = Path(tmp)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        result = download(params.download, out_dir=root / "raw", cache_dir=root / "downloads",
                          seed=params.seed)
        timings["download"] = time.perf_counter() - start
        cpu["download"] = cpu_seconds() - cpu_start
        peaks["download"] = stage_peak_mib()
        worker_peaks["download"] = peak_mib()[1]
        start, cpu_start = time.perf_counter(), cpu_seconds()
        checked = validate(params.validate_params, params.images, raw_dir=root / "raw",
                           manifest_path=root / "manifest.parquet",
                           reports_dir=root / "reports")
        timings["validate"] = time.perf_counter() - start
        cpu["validate"] = cpu_seconds() - cpu_start
        peaks["validate"] = stage_peak_mib()
        worker_peaks["validate"] = peak_mib()[1]
        checked.raise_if_failed()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        packed = prepare(params.prepare, params.images, seed=params.seed, raw_dir=root / "raw",
                         manifest_path=root / "manifest.parquet", out_dir=root / "prepared")
        timings["prepare"] = time.perf_counter() - start
        cpu["prepare"] = cpu_seconds() - cpu_start
        peaks["prepare"] = stage_peak_mib()
        worker_peaks["prepare"] = peak_mib()[1]
    own, children = peak_mib()
    own = max([own, *(peak for peak in peaks.values() if peak is not None)])
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, load {load_before:.2f} "
          f"at the start, {os.getloadavg()[0]:.2f} at the end, {time.strftime('%Y-%m-%d')}")
    print(f"records: {result.counts}, validation {'passed' if checked.success else 'FAILED'}, "
          f"prepared {packed.metrics()}")
    print(f"{'stage':<10} {'seconds':>8} {'cpu-s':>8} {'peak MiB':>9} {'workers':>8}")
    for stage, seconds in timings.items():
        peak = peaks[stage]
        print(f"{stage:<10} {seconds:8.2f} {cpu[stage]:8.2f} "
              f"{'?' if peak is None else f'{peak:.0f}':>9} {worker_peaks[stage]:8.0f}")
    print(f"{'total':<10} {sum(timings.values()):8.2f} {sum(cpu.values()):8.2f}   "
          f"(target < 30 s)")
    print("validate: " + ", ".join(f"{k} {v:.2f}" for k, v in checked.timings.items()))
    print("prepare: " + ", ".join(f"{k} {v:.2f}" for k, v in packed.timings.items()))
    print(f"peak RSS: {own:.0f} MiB main process, {children:.0f} MiB largest worker "
          f"(target < 2048 MiB)")


if __name__ == "__main__":
    main()
