"""Sliceable containers of per-image random parameters, and the draws that fill them.

Augmentation is split into *sample* (draw every random number for a batch from
one explicit :class:`torch.Generator`) and *apply* (a pure function of images and
parameters). Two things depend on that split:

* bit-exact resume: the training engine checkpoints the generator's state, and
  nothing else holds randomness;
* DistributedDataParallel: every rank samples the parameters of the *global*
  batch with the same generator and applies ``params[rank_slice]`` to its own
  images, so the result equals a single process applying ``params`` to the
  whole batch.

Convention of every container: a tensor field with a leading dimension holds
one row per image and is sliced; a 0-d tensor holds one value per batch
(MixUp's lambda) and is kept as is; nested containers are sliced recursively.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self

import torch
from torch import Tensor

Index = slice | int | Tensor


def _take(value: Any, index: Index) -> Any:
    if isinstance(value, ParamBatch):
        return value[index]
    if isinstance(value, Tensor) and value.ndim > 0:
        rows = value[index]
        return rows.unsqueeze(0) if isinstance(index, int) else rows
    return value


@dataclasses.dataclass(frozen=True)
class ParamBatch:
    """Base of the parameter containers: slicing, moving and concatenating."""

    def __getitem__(self, index: Index) -> Self:
        """The parameters of a subset of the images (an int keeps a batch of one)."""
        return dataclasses.replace(
            self, **{f.name: _take(getattr(self, f.name), index) for f in dataclasses.fields(self)}
        )

    def __len__(self) -> int:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ParamBatch):
                return len(value)
            if isinstance(value, Tensor) and value.ndim > 0:
                return int(value.shape[0])
        raise TypeError(f"{type(self).__name__} holds no per-image parameters")

    def to(self, device: torch.device | str) -> Self:
        def move(value: Any) -> Any:
            if isinstance(value, ParamBatch | Tensor):
                return value.to(device)
            return value

        return dataclasses.replace(
            self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    @classmethod
    def cat(cls, parts: list[Self]) -> Self:
        """Stack the per-image rows of several batches (per-batch values come from the first)."""
        first = parts[0]
        merged: dict[str, Any] = {}
        for f in dataclasses.fields(first):
            values = [getattr(p, f.name) for p in parts]
            head = values[0]
            if isinstance(head, ParamBatch):
                merged[f.name] = type(head).cat(values)
            elif isinstance(head, Tensor) and head.ndim > 0:
                merged[f.name] = torch.cat(values)
            else:
                merged[f.name] = head
        return dataclasses.replace(first, **merged)


class Draw:
    """Random draws from one generator, moved to the device the images live on.

    Numbers are drawn on the generator's device (a CPU generator gives the same
    stream whatever the training device; a CUDA generator keeps everything on
    the GPU with no host transfer) and in a fixed order, so one generator state
    always gives the same parameters.
    """

    def __init__(self, generator: torch.Generator, device: torch.device | str) -> None:
        self.generator = generator
        self.device = torch.device(device)

    def place(self, value: Tensor) -> Tensor:
        """Move a draw to the images' device (no-op when the generator is there already)."""
        # non_blocking only host -> GPU: a GPU -> host copy must finish before it is read
        return value.to(self.device, non_blocking=self.device.type == "cuda")

    def _rand(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self.generator.device)

    def uniform(self, low: float, high: float, *shape: int) -> Tensor:
        """Like ``torch.empty(shape).uniform_(low, high)``."""
        return self.place(self._rand(*shape) * (high - low) + low)

    def normal(self, *shape: int) -> Tensor:
        """Standard normal draws, like ``torch.randn(shape)``."""
        return self.place(torch.randn(shape, generator=self.generator,
                                      device=self.generator.device))

    def chance(self, p: float, *shape: int) -> Tensor:
        """Bool mask, True with probability ``p`` (False everywhere for p=0, True for p=1)."""
        return self.place(self._rand(*shape) < p)

    def integers(self, low: int, high: int, *shape: int) -> Tensor:
        """Uniform integers in ``[low, high)``, int64."""
        value = torch.randint(low, high, shape, generator=self.generator,
                              device=self.generator.device)
        return self.place(value)

    def below(self, high: Tensor, *shape: int) -> Tensor:
        """Uniform integers in ``[0, high)`` with a per-row bound (``high`` >= 1, on the device)."""
        u = self.uniform(0.0, 1.0, *shape)
        return torch.minimum((u * high).floor().long(), high - 1)

    def permutations(self, rows: int, size: int) -> Tensor:
        """One uniform random permutation of ``range(size)`` per row (argsort of uniforms)."""
        return self.place(self._rand(rows, size).argsort(dim=1))

    def beta(self, alpha: float) -> Tensor:
        """One Beta(alpha, alpha) draw as a 0-d float tensor.

        ``torch.distributions.Beta`` cannot take a generator; the Dirichlet
        sampler can (torchvision's own AugMix samples through it too).
        """
        concentration = torch.full((1, 2), float(alpha), device=self.generator.device)
        return self.place(torch._sample_dirichlet(concentration, generator=self.generator)[0, 0])


def random_boxes(
    draw: Draw,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    *,
    tries: int = 10,
    side_from_ratio: str = "width",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Vectorized rejection sampling of the boxes of RandomResizedCrop / RandomErasing.

    torchvision draws up to ``tries`` (area, log-aspect) pairs per image and
    keeps the first that fits; here all tries of all images are drawn at once
    and the first fitting one is picked with ``argmax`` (no loop, no host sync).
    ``side_from_ratio`` says which side grows with the aspect ratio: ``"width"``
    for RandomResizedCrop (w = sqrt(area * r)), ``"height"`` for RandomErasing.
    Returns ``top, left, h, w, found`` (int64, bool); where ``found`` is False
    the box values are meaningless and the caller applies its fallback.
    """
    area = float(height * width)
    target = draw.uniform(scale[0], scale[1], n, tries) * area
    aspect = torch.exp(draw.uniform(math.log(ratio[0]), math.log(ratio[1]), n, tries))
    along = torch.round(torch.sqrt(target * aspect)).long()
    across = torch.round(torch.sqrt(target / aspect)).long()
    w, h = (along, across) if side_from_ratio == "width" else (across, along)
    fits = _fits(h, w, height, width, side_from_ratio)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    top = draw.below((height - h + 1).clamp(min=1), n)
    left = draw.below((width - w + 1).clamp(min=1), n)
    return top, left, h, w, found


def _fits(h: Tensor, w: Tensor, height: int, width: int, side_from_ratio: str) -> Tensor:
    if side_from_ratio == "width":  # RandomResizedCrop: a non-empty box inside the image
        return (w > 0) & (w <= width) & (h > 0) & (h <= height)
    return (h < height) & (w < width)  # RandomErasing: strictly smaller than the image


def crop_boxes(draw: Draw, n: int, size: int, scale: tuple[float, float],
               ratio: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RandomResizedCrop's ``top, left, h, w`` per image of a square ``size`` image.

    After ``tries`` misses torchvision falls back to the central crop at the
    nearest allowed aspect ratio (the whole image when the ratio range spans 1).
    """
    top, left, h, w, found = random_boxes(draw, n, size, size, scale, ratio)
    if ratio[0] > 1.0:
        fh, fw = round(size / ratio[0]), size
    elif ratio[1] < 1.0:
        fh, fw = size, round(size * ratio[1])
    else:
        fh, fw = size, size
    fallback = ((size - fh) // 2, (size - fw) // 2, fh, fw)
    top, left, h, w = (torch.where(found, v, torch.full_like(v, f))
                       for v, f in zip((top, left, h, w), fallback, strict=True))
    return top, left, h, w


def box_fit_fraction(height: int, width: int, scale: tuple[float, float],
                     ratio: tuple[float, float], side_from_ratio: str = "width",
                     steps: int = 101) -> float:
    """Share of the (scale, log-ratio) range whose box fits the image (grid estimate).

    0 means the rejection sampler can never succeed: every draw falls back.
    """
    scales = torch.linspace(scale[0], scale[1], steps, dtype=torch.float64)
    logs = torch.linspace(math.log(ratio[0]), math.log(ratio[1]), steps, dtype=torch.float64)
    target = scales.reshape(-1, 1) * float(height * width)
    aspect = torch.exp(logs).reshape(1, -1)
    along = torch.round(torch.sqrt(target * aspect)).long()
    across = torch.round(torch.sqrt(target / aspect)).long()
    w, h = (along, across) if side_from_ratio == "width" else (across, along)
    return float(_fits(h, w, height, width, side_from_ratio).double().mean())
