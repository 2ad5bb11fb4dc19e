"""Where and how training runs: device, precision, determinism, and distribution.

One :class:`Runtime` per process. Under ``torchrun`` it joins the process
group (NCCL on GPU, gloo on CPU) from the environment torchrun sets, so the
stages need no code change to run on several GPUs or nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from refinery.params import EngineParams
from refinery.ranks import env_rank, env_world_size

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool
    compile: bool
    deterministic: bool
    data_on_device: str

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def maybe_compile(self, fn: Callable[P, R]) -> Callable[P, R]:
        """``fn`` compiled (static shapes: a training step's never change) when compile is on."""
        if not self.compile:
            return fn
        return torch.compile(fn, dynamic=False)  # type: ignore[return-value]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def describe(self) -> dict[str, str | int | bool]:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {
            "device": str(self.device),
            "device_name": name,
            "world_size": self.world_size,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "channels_last": self.channels_last,
            "compile": self.compile,
            "deterministic": self.deterministic,
            "threads": torch.get_num_threads(),
        }

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def native_bf16_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16).

    There bf16 autocast pays: a SimCLR step of the compact teacher took 0.18 s instead of
    0.25 s on the CPU box (AVX512-BF16), and five digits seeds kept teacher - scratch at
    +2.5 points (docs/benchmarks.md). Without them oneDNN emulates bf16, slower than fp32.
    """
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags")
             for flag in line.partition(":")[2].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def make_runtime(params: EngineParams, seed: int) -> Runtime:
    """Pick the device and precision, join the process group under torchrun, seed RNGs."""
    rank, world, local_rank = env_rank(), env_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    want = params.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device is 'cuda' but no CUDA device is available")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = not params.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if params.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=use_cuda)
        if use_cuda:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
    amp = params.amp
    native = use_cuda or native_bf16_cpu()
    amp_dtype = torch.bfloat16 if (amp == "bf16" or (amp == "auto" and native)) else None
    if amp_dtype is not None and not native:
        log.info("bf16 autocast on a CPU without bf16 instructions: slower than fp32, "
                 "but as asked")
    # channels_last pays on GPUs (tensor cores) and on CPUs too (oneDNN's NHWC convolutions
    # ran ResNet-18 training about 1.8x faster on this project's 2-core CI machine).
    channels_last = params.channels_last != "off"
    seed_everything(seed)
    return Runtime(
        device=device,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        # auto: compile on CUDA, where fusing the augmentation's and the loss's many small
        # kernels pays; on the CPU a compile of ResNet-18's step costs minutes on two cores
        # and the digits default would be slower for it.
        compile=use_cuda if params.compile == "auto" else bool(params.compile),
        deterministic=params.deterministic,
        data_on_device=params.data_on_device,
    )


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics span every rank, for gloo/CPU training.

    ``nn.SyncBatchNorm`` runs on GPUs only; without this, each CPU rank would
    normalize by its own slice and a 2-process run would not match one process
    with the same global batch. Handles 2-D (BatchNorm1d) and 4-D inputs.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), count]))
        total = sums[-1]
        mean = sums[:channels] / total
        var = (sums[channels : 2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else (
                    1.0 / float(self.num_batches_tracked))
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())
        shape = (1, channels) + (1,) * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace BatchNorm layers by their cross-rank version for this device type."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    result = module
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        result = CpuSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )
        if module.affine:
            with torch.no_grad():
                result.weight.copy_(module.weight)
                result.bias.copy_(module.bias)
        if module.track_running_stats:
            result.running_mean = module.running_mean
            result.running_var = module.running_var
            result.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        result.add_module(name, _convert_cpu(child))
    return result
