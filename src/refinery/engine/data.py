"""Training data held as uint8 tensors, on the device when they fit.

CIFAR-10's 50,000 training images are 150 MiB as uint8: on a GPU they stay
resident and a batch is one index operation, with no DataLoader workers and
no host-to-device copy per step. Data that does not fit stays in pinned host
memory and each batch is copied asynchronously.
"""

from __future__ import annotations

import logging

import torch

from refinery.engine.runtime import Runtime

log = logging.getLogger(__name__)

#: Share of free GPU memory the resident data may take under ``data_on_device: auto``.
RESIDENT_SHARE = 0.4


class DeviceData:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, rt: Runtime) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("DeviceData expects uint8 (N, C, H, W) images")
        self.device = rt.device
        self.resident = self._place(images, rt)
        if self.resident:
            self._images = images.to(rt.device)
            self._labels = labels.to(rt.device) if labels is not None else None
        else:
            pin = rt.device.type == "cuda"
            self._images = images.pin_memory() if pin else images
            self._labels = labels.pin_memory() if (pin and labels is not None) else labels

    @staticmethod
    def _place(images: torch.Tensor, rt: Runtime) -> bool:
        if rt.device.type == "cpu" or rt.data_on_device == "never":
            return rt.device.type == "cpu"
        if rt.data_on_device == "always":
            return True
        free, _ = torch.cuda.mem_get_info(rt.device)
        fits = images.numel() < RESIDENT_SHARE * free
        if not fits:
            log.info("data (%.1f GiB) kept in pinned host memory", images.numel() / 2**30)
        return fits

    @property
    def index_device(self) -> torch.device:
        """Where indices into this data should live: no copy when a batch is taken."""
        return self.device if self.resident else torch.device("cpu")

    def __len__(self) -> int:
        return int(self._images.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._images.shape)

    def images(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images at ``indices``, on the training device."""
        if self.resident:
            return self._images[indices.to(self.device)]
        return self._images[indices.cpu()].to(self.device, non_blocking=True)

    def labels(self, indices: torch.Tensor) -> torch.Tensor:
        if self._labels is None:
            raise ValueError("this data set has no labels")
        if self.resident:
            return self._labels[indices.to(self.device)]
        return self._labels[indices.cpu()].to(self.device, non_blocking=True)

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        """Index tensors covering the whole set in order (for evaluation)."""
        n = len(self)
        return [torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def to_float(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (the models normalize themselves)."""
    out = images.float().div_(255.0)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
