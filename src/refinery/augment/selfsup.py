"""The self-supervised two-view policy (SimCLR's), independently random per image and view.

Per view, as SimCLR's torchvision pipeline: ``RandomResizedCrop(size, scale,
ratio)``, ``RandomHorizontalFlip``, ``RandomApply([ColorJitter(b, c, s, h)],
p=jitter_p)`` (the four adjustments in a random order per image, as
ColorJitter draws one), ``RandomGrayscale(p)``, ``RandomApply([GaussianBlur(k,
sigma)], p=blur_p)``; then, where set (``augment.ssl`` picks them by channel
count), ``RandomAffine(degrees=rotate_deg)`` (bilinear, about the center,
zeros outside) and additive Gaussian noise of ``noise_std``, clamped to
[0, 1]. Both views of a batch go through the ops as one batch of
``2N`` images, halving the kernel launches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from refinery.augment import functional as A
from refinery.augment.batch import Draw, ParamBatch, crop_boxes

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # ColorJitter's fn_idx order


@dataclass(frozen=True)
class ViewParams(ParamBatch):
    top: Tensor  # (N,) int64 crop box
    left: Tensor
    height: Tensor
    width: Tensor
    flip: Tensor  # (N,) bool
    jitter: Tensor  # (N,) bool: ColorJitter applied
    order: Tensor  # (N, 4) int64: the order of JITTER_OPS
    brightness: Tensor  # (N,) factors
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    gray: Tensor  # (N,) bool
    blur: Tensor  # (N,) bool
    sigma: Tensor  # (N,) float
    angle: Tensor  # (N,) degrees
    noise: Tensor  # (N, C, H, W) standard normal; (N, 0, 0, 0) when noise_std is 0


@dataclass(frozen=True)
class TwoViewParams(ParamBatch):
    first: ViewParams
    second: ViewParams


@dataclass(frozen=True)
class SslPolicy:
    """Resolved two-view augmentation for images of one size and channel count."""

    size: int
    channels: int
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    flip: bool = False
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    rotate_deg: float = 0.0
    noise_std: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SslPolicy:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def _active_jitter(self) -> list[int]:
        """Indices of the ColorJitter ops that can change an image of this channel count.

        As torchvision's ColorJitter, a strength of 0 drops the op; saturation and
        hue leave gray images as they are.
        """
        colour_only = {"saturation", "hue"} if self.channels == 1 else set()
        return [i for i, name in enumerate(JITTER_OPS)
                if getattr(self, name) > 0 and name not in colour_only]

    # ----------------------------------------------------------------- sample

    def sample_view(self, n: int, generator: torch.Generator,
                    device: torch.device | str = "cpu") -> ViewParams:
        draw = Draw(generator, device)
        top, left, h, w = crop_boxes(draw, n, self.size, self.crop_scale, self.crop_ratio)
        return ViewParams(
            top=top, left=left, height=h, width=w,
            flip=draw.chance(0.5 if self.flip else 0.0, n),
            jitter=draw.chance(self.jitter_p, n),
            order=draw.permutations(n, 4),
            brightness=draw.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness, n),
            contrast=draw.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast, n),
            saturation=draw.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation, n),
            hue=draw.uniform(-self.hue, self.hue, n),
            gray=draw.chance(self.grayscale_p, n),
            blur=draw.chance(self.blur_p, n),
            sigma=draw.uniform(self.blur_sigma[0], self.blur_sigma[1], n),
            angle=draw.uniform(-self.rotate_deg, self.rotate_deg, n),
            noise=draw.normal(n, self.channels, self.size, self.size) if self.noise_std > 0
            else draw.place(torch.zeros(n, 0, 0, 0)),
        )

    def sample(self, n: int, generator: torch.Generator,
               device: torch.device | str = "cpu") -> TwoViewParams:
        """Parameters of both views of ``n`` images (first view's draws, then second's)."""
        return TwoViewParams(first=self.sample_view(n, generator, device),
                             second=self.sample_view(n, generator, device))

    # ------------------------------------------------------------------ apply

    @A.full_precision
    def apply_view(self, images: Tensor, params: ViewParams) -> Tensor:
        """One view: uint8 or float ``(N, C, H, W)`` -> float32 in [0, 1]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(f"policy is for (N, {self.channels}, {self.size}, {self.size}) "
                             f"images, got {tuple(images.shape)}")
        p = params
        # a fresh tensor: the steps below may write into it
        x = A.resized_crop(A.to_float(images), p.top, p.left, p.height, p.width,
                           p.flip if self.flip else None)
        x = self._jitter(x, p)
        if self.channels == 3 and self.grayscale_p > 0:
            x = A.grayscale(x, p.gray, inplace=True)
        if self.blur_p > 0:
            x = A.where_chosen(
                x, p.blur, lambda t, i: A.gaussian_blur(t, self.blur_kernel, A.pick(p.sigma, i)),
                inplace=True)
        if self.rotate_deg > 0:
            n = x.shape[0]
            zeros2 = torch.zeros(n, 2, dtype=torch.float64, device=x.device)
            matrix = A.inverse_affine_matrix(zeros2, p.angle.to(torch.float64), zeros2,
                                             torch.ones(n, dtype=torch.float64, device=x.device),
                                             zeros2)
            x = A.affine(x, matrix, mode="bilinear")
        if self.noise_std > 0:
            x = x.add_(p.noise.to(x.dtype), alpha=self.noise_std).clamp_(0.0, 1.0)
        return x

    def _jitter(self, x: Tensor, p: ViewParams) -> Tensor:
        """ColorJitter with each image's own op order: slot ``k`` runs each image's k-th op."""
        active = self._active_jitter()
        if self.jitter_p <= 0 or not active:
            return x
        adjust: dict[int, A.PerImageOp] = {
            0: lambda t, i: A.adjust_brightness(t, A.pick(p.brightness, i)),
            1: lambda t, i: A.adjust_contrast(t, A.pick(p.contrast, i)),
            2: lambda t, i: A.adjust_saturation(t, A.pick(p.saturation, i)),
            3: lambda t, i: A.adjust_hue(t, A.pick(p.hue, i)),
        }
        for slot in range(4):
            op = p.order[:, slot]
            for k in active:  # one op per image per slot: disjoint sets, applied in turn
                x = A.where_chosen(x, p.jitter & (op == k), adjust[k], inplace=True)
        return x

    def apply(self, images: Tensor, params: TwoViewParams) -> tuple[Tensor, Tensor]:
        """Both views of every image, as two float32 ``(N, C, H, W)`` batches."""
        n = images.shape[0]
        both = torch.cat((images, images))
        out = self.apply_view(both, ViewParams.cat([params.first, params.second]))
        return out[:n], out[n:]

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Sample and apply in one go (single process)."""
        return self.apply(images, self.sample(images.shape[0], generator, images.device))
