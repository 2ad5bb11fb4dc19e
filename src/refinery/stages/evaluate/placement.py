"""Where ``evaluate`` computes each model's predictions: the one place that decides.

The accuracy, corruption and confusion passes (seven passes over the test set
per model) are batch inference, so a float model (teacher, scratch, student,
pruned student) runs them where the training engine would run
(:func:`refinery.engine.runtime.make_runtime` picks the device and the
autocast dtype from ``engine.device`` and ``engine.amp``): on the GPU when one
is present, under ``torch.inference_mode`` and the engine's autocast. On the
CPU the passes stay as they always were, fp32 without autocast, so a CPU run
scores exactly what it scored before (the engine's bf16 on bf16-capable CPUs
is a training speed-up, not how the models are reported). The int8 program is
CPU-only (oneDNN int8 kernels) and always predicts on the CPU. Latency and CPU
throughput figures are always measured on the CPU, whatever this says.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from refinery.engine.runtime import Runtime
from refinery.scoring import Predict

ModelKind = Literal["float", "int8"]
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """A device for the prediction passes, and the autocast dtype there (None: fp32)."""

    device: torch.device = CPU
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def predictor(self, model: nn.Module) -> Predict:
        """``model``'s logits for a float batch on any device, computed on :attr:`device`.

        On the CPU the model itself runs (no copy); elsewhere a copy moves there
        (the CPU model stays for the latency figures).
        """
        if self.on_cpu:
            runner = model.eval()
        else:
            runner = copy.deepcopy(model).to(self.device).eval()
            if self.channels_last:
                runner = runner.to(memory_format=torch.channels_last)
        memory = torch.channels_last if self.channels_last else torch.contiguous_format

        def run(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), self.autocast():
                x = images.to(self.device, non_blocking=True)
                if not self.on_cpu:
                    x = x.contiguous(memory_format=memory)
                return runner(x)

        return run


def prediction_placement(kind: ModelKind, runtime: Runtime | None) -> Placement:
    """Where a model of ``kind`` predicts, given the engine's choice (``None``: the CPU).

    float: the engine's device, with its autocast dtype and memory format when
    that device is not the CPU; int8: always the CPU.
    """
    if kind not in ("float", "int8"):
        raise ValueError(f"unknown model kind {kind!r}; expected 'float' or 'int8'")
    if kind == "int8" or runtime is None or runtime.device.type == "cpu":
        return Placement()
    return Placement(runtime.device, runtime.amp_dtype, runtime.channels_last)
