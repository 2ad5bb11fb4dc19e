"""What a model costs to ship and run: parameters, file size, latency, throughput.

CPU numbers depend on the thread count more than on anything else, so every
measurement pins ``torch.set_num_threads(threads)``, restores the previous
value afterwards, and records the count next to the numbers. Inputs are
random images of the model's shape (content does not change the cost of a
convolutional network).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinery.params import LatencyParams

Predict = Callable[[torch.Tensor], torch.Tensor]

#: Untimed batches before a throughput measurement: the first call of a
#: compiled model at a new batch size compiles, the second shows steady state.
THROUGHPUT_WARMUP = 2


def file_size_mb(path: str | Path) -> float:
    """Size on disk in MB (10^6 bytes)."""
    return Path(path).stat().st_size / 1e6


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(threads)``; restore the old value after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _images(batch: int, shape: tuple[int, int, int], device: str | torch.device = "cpu",
            ) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((batch, *shape), generator=generator).to(device)


@dataclass(frozen=True)
class Latency:
    p50_ms: float  # wall clock: what a caller waits
    p95_ms: float
    batch: int
    threads: int
    iterations: int
    cpu_p50_ms: float  # process CPU time per call: with 1 thread, the wall time minus waits
    # for a core, so it stays near the uncontended latency on a busy shared machine


def cpu_latency(predict: Predict, shape: tuple[int, int, int], *, threads: int,
                warmup: int, iterations: int, batch: int = 1) -> Latency:
    """p50/p95 wall time of one call on a ``(batch, *shape)`` input, after ``warmup`` calls."""
    x = _images(batch, shape)
    wall = np.empty(iterations)
    cpu = np.empty(iterations)
    with fixed_threads(threads), torch.no_grad():
        for _ in range(warmup):
            predict(x)
        for i in range(iterations):
            start, start_cpu = time.perf_counter(), time.process_time()
            predict(x)
            wall[i] = time.perf_counter() - start
            cpu[i] = time.process_time() - start_cpu
    p50, p95 = np.percentile(wall * 1e3, [50, 95])
    return Latency(p50_ms=float(p50), p95_ms=float(p95), batch=batch, threads=threads,
                   iterations=iterations, cpu_p50_ms=float(np.median(cpu) * 1e3))


@dataclass(frozen=True)
class Throughput:
    images_per_s: float
    batch: int
    threads: int | None  # None on GPU
    device: str  # "cpu", or the GPU's name (bf16 autocast)


def cpu_throughput(predict: Predict, shape: tuple[int, int, int], *, threads: int,
                   batch: int, iterations: int) -> Throughput:
    """Images per second over ``iterations`` back-to-back batches of ``batch``."""
    x = _images(batch, shape)
    with fixed_threads(threads), torch.no_grad():
        for _ in range(THROUGHPUT_WARMUP):
            predict(x)
        start = time.perf_counter()
        for _ in range(iterations):
            predict(x)
        elapsed = time.perf_counter() - start
    return Throughput(images_per_s=batch * iterations / elapsed, batch=batch, threads=threads,
                      device="cpu")


def gpu_throughput(predict: Predict, shape: tuple[int, int, int], *, batch: int,
                   iterations: int, warmup: int = 10) -> Throughput | None:
    """bf16-autocast CUDA throughput timed with CUDA events; ``None`` without CUDA.

    ``predict`` must already live on the GPU. Kernel launches are asynchronous,
    so timing brackets the loop with events and synchronizes before reading them.
    """
    if not torch.cuda.is_available():
        return None
    x = _images(batch, shape, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(warmup):
            predict(x)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iterations):
            predict(x)
        end.record()
        torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return Throughput(images_per_s=batch * iterations / seconds, batch=batch, threads=None,
                      device=torch.cuda.get_device_name())


@dataclass(frozen=True)
class Cost:
    """The cost columns of the comparison table; ``None`` where not measured."""

    parameters: int | None = None
    file_mb: float | None = None
    latency: Latency | None = None
    throughput: Throughput | None = None
    gpu_throughput: Throughput | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_cost(
    predict: Predict | None,
    shape: tuple[int, int, int],
    params: LatencyParams,
    *,
    parameters: int | None = None,
    file: str | Path | None = None,
    gpu_predict: Predict | None = None,
) -> Cost:
    """Batch-1 CPU latency and CPU throughput of ``predict`` (when given), size figures,
    and GPU throughput of ``gpu_predict`` when given and CUDA is available."""
    latency = throughput = gpu = None
    if predict is not None:
        latency = cpu_latency(predict, shape, threads=params.threads, warmup=params.warmup,
                              iterations=params.iterations)
        throughput = cpu_throughput(predict, shape, threads=params.threads,
                                    batch=params.throughput_batch,
                                    iterations=params.throughput_iterations)
    if gpu_predict is not None:
        gpu = gpu_throughput(gpu_predict, shape, batch=params.throughput_batch,
                             iterations=params.throughput_iterations)
    return Cost(parameters=parameters, file_mb=file_size_mb(file) if file else None,
                latency=latency, throughput=throughput, gpu_throughput=gpu)
