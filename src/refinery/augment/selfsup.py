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
CONTRAST, SATURATION, HUE = 1, 2, 3


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
        """ColorJitter in each image's own order, each active op run once per image.

        Why per image, and how without running every op in every slot: SimCLR
        jitters each image in its own random order (its TF code, and
        torchvision's ColorJitter called per image), and the sampled
        ``order`` already says so; torchvision v2 on a batch would give the
        whole batch one order, and a per-batch order chosen on the host would
        make ``torch.compile`` specialize on it (24 graphs) or need a host
        sync. Brightness, contrast and saturation are one operation with
        different weights (:func:`A.jitter_blend`), so a slot runs one blend
        whatever op each image has there; only hue is different. An image's
        order is ``p`` blends, hue, ``m - p`` blends (``m`` active blends), so
        the schedule ``m`` blend slots, hue, ``m`` blend slots fits every order
        with hue run once: image ``i`` runs its first ``p_i`` blends in the
        first slots, its others right after hue, and skips the rest. On an
        accelerator that is ``2m`` blends and one hue over the batch (6 + 1
        for RGB) instead of 16 ops; on CPU each slot runs on the images that
        use it. Every image gets the same bits as applying its four ops one
        after the other (the tests check against torchvision image by image).
        """
        active = self._active_jitter()
        if self.jitter_p <= 0 or not active:
            return x
        blends = [k for k in active if k != HUE]
        hue = HUE in active
        if not blends:
            return self._hue(x, p)
        n, m = x.shape[0], len(blends)
        position = p.order.argsort(dim=1)  # (N, 4): where each op comes in the image's order
        blend_pos = torch.stack([position[:, k] for k in blends], dim=1)  # (N, m)
        ranked = blend_pos.argsort(dim=1)  # (N, m): the image's 1st, 2nd, ... blend
        steps = torch.arange(m, device=x.device).expand(n, m)
        if hue:  # m slots before hue, m after: image i fills p_i before, m - p_i after
            before = (blend_pos < position[:, HUE:]).sum(dim=1, keepdim=True)
            rank = torch.cat((steps, steps + before), dim=1)
            used = torch.cat((steps < before, steps + before < m), dim=1)
        else:
            rank, used = steps, torch.ones_like(steps, dtype=torch.bool)
        used = used & p.jitter.reshape(-1, 1)  # (N, slots): the slot runs on the image
        which = ranked.gather(1, rank.clamp(max=m - 1))  # (N, slots): index into blends
        factor = torch.stack([getattr(p, JITTER_OPS[k]) for k in blends], dim=1)
        factor = factor.to(x.dtype).gather(1, which)
        keep = 1.0 - factor
        zero = torch.zeros_like(keep)
        to_gray, to_mean = (torch.where(which == blends.index(k), keep, zero)
                            if k in blends else zero for k in (SATURATION, CONTRAST))
        for s in range(rank.shape[1]):
            if hue and s == m:
                x = self._hue(x, p)
            x = A.where_chosen(x, used[:, s], lambda t, i, s=s: A.jitter_blend(
                t, A.pick(factor[:, s], i), A.pick(to_gray[:, s], i), A.pick(to_mean[:, s], i)),
                inplace=True)
        return x

    def _hue(self, x: Tensor, p: ViewParams) -> Tensor:
        return A.where_chosen(x, p.jitter, lambda t, i: A.adjust_hue(t, A.pick(p.hue, i)),
                              inplace=True)

    def apply(self, images: Tensor, params: TwoViewParams) -> tuple[Tensor, Tensor]:
        """Both views of every image, as two float32 ``(N, C, H, W)`` batches."""
        n = images.shape[0]
        both = torch.cat((images, images))
        out = self.apply_view(both, ViewParams.cat([params.first, params.second]))
        return out[:n], out[n:]

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Sample and apply in one go (single process)."""
        return self.apply(images, self.sample(images.shape[0], generator, images.device))
