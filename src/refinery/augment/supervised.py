"""The supervised policy: crop or translate, flip, RandAugment/TrivialAugment, erasing, mixing.

Per image, in torchvision's usual order: ``RandomCrop(size, padding=p)`` (or
``RandomResizedCrop``), ``RandomHorizontalFlip``, ``RandAugment`` /
``TrivialAugmentWide``, ``RandomErasing``; then, per batch, ``MixUp`` or
``CutMix`` (chosen at random when both are on, like torchvision's reference
recipe's ``RandomChoice``).

Mixing differs from torchvision's in one respect, on purpose: torchvision pairs
image ``i`` with ``i - 1`` (``roll``), which pairs across the boundary between
two ranks' slices; here image ``2k`` and ``2k + 1`` are mixed with each other,
so a rank holding an even-length, even-aligned slice mixes exactly as a single
process would. Lambda (one per batch) and the CutMix box follow torchvision.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as nnf
from torch import Tensor

from refinery.augment import autoaugment
from refinery.augment import functional as A
from refinery.augment.batch import Draw, ParamBatch, crop_boxes, random_boxes

ERASING_SCALE = (0.02, 0.33)  # RandomErasing's defaults
ERASING_RATIO = (0.3, 3.3)
RESIZED_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default


@dataclass(frozen=True)
class Shift(ParamBatch):
    dy: Tensor  # (N,) int64, rows shifted in from the top (negative: from the bottom)
    dx: Tensor


@dataclass(frozen=True)
class Box(ParamBatch):
    top: Tensor  # (N,) int64
    left: Tensor
    height: Tensor
    width: Tensor


@dataclass(frozen=True)
class AutoParams(ParamBatch):
    ops: Tensor  # (N, layers) int64 index into autoaugment.OPS
    magnitudes: Tensor  # (N, layers) float32, signed


@dataclass(frozen=True)
class EraseParams(ParamBatch):
    apply: Tensor  # (N,) bool
    box: Box


@dataclass(frozen=True)
class MixParams(ParamBatch):
    """Per batch (all 0-d): kept whole when the image parameters are sliced."""

    cutmix: Tensor  # bool: CutMix, else MixUp
    lam: Tensor  # MixUp's lambda
    x1: Tensor  # CutMix box, pixels
    y1: Tensor
    x2: Tensor
    y2: Tensor


@dataclass(frozen=True)
class SupervisedParams(ParamBatch):
    flip: Tensor  # (N,) bool
    shift: Shift | None = None
    box: Box | None = None
    auto: AutoParams | None = None
    erase: EraseParams | None = None
    mix: MixParams | None = None


@dataclass(frozen=True)
class SupervisedPolicy:
    """Resolved supervised augmentation for images of one size and channel count."""

    size: int
    channels: int
    num_classes: int
    crop: Literal["translate", "resized", "none"] = "translate"
    translate_px: int = 0
    translate_padding: Literal["reflect", "zeros"] = "reflect"
    resized_scale: tuple[float, float] = (0.35, 1.0)
    resized_ratio: tuple[float, float] = RESIZED_RATIO
    flip: bool = False
    auto: Literal["none", "randaugment", "trivialaugment"] = "none"
    auto_layers: int = 2
    auto_magnitude: int = 9
    erasing_p: float = 0.0
    erasing_scale: tuple[float, float] = ERASING_SCALE
    erasing_ratio: tuple[float, float] = ERASING_RATIO
    erasing_value: tuple[float, ...] = (0.0,)  # per channel, on the 0..1 scale
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SupervisedPolicy:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    @property
    def mixes(self) -> bool:
        """Whether :meth:`mix` changes batches (and returns soft targets)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    # ----------------------------------------------------------------- sample

    def sample(self, n: int, generator: torch.Generator,
               device: torch.device | str = "cpu") -> SupervisedParams:
        """Draw every random parameter of a batch of ``n`` images, in a fixed order."""
        draw = Draw(generator, device)
        shift = box = auto = erase = mix = None
        if self.crop == "translate":
            p = self.translate_px
            shift = Shift(dy=draw.integers(-p, p + 1, n), dx=draw.integers(-p, p + 1, n))
        elif self.crop == "resized":
            box = Box(*crop_boxes(draw, n, self.size, self.resized_scale, self.resized_ratio))
        flip = draw.chance(0.5 if self.flip else 0.0, n)
        if self.auto != "none":
            layers = self.auto_layers if self.auto == "randaugment" else 1
            magnitude = self.auto_magnitude if self.auto == "randaugment" else None
            ops, mags = autoaugment.sample(draw, n, self.auto, layers, magnitude,
                                           self.size, self.size)
            auto = AutoParams(ops=ops, magnitudes=mags)
        if self.erasing_p > 0:
            apply = draw.chance(self.erasing_p, n)
            top, left, h, w, found = random_boxes(
                draw, n, self.size, self.size, self.erasing_scale, self.erasing_ratio,
                side_from_ratio="height")
            erase = EraseParams(apply=apply & found, box=Box(top, left, h, w))
        if self.mixes:
            mix = self._sample_mix(draw)
        return SupervisedParams(flip=flip, shift=shift, box=box, auto=auto, erase=erase, mix=mix)

    def _sample_mix(self, draw: Draw) -> MixParams:
        """Lambda ~ Beta(alpha, alpha) of each enabled method; with both, a coin picks one."""
        lams = {}
        if self.mixup_alpha > 0:
            lams["mixup"] = draw.beta(self.mixup_alpha)
        if self.cutmix_alpha > 0:
            lams["cutmix"] = draw.beta(self.cutmix_alpha)
        if len(lams) == 2:
            cutmix = draw.chance(0.5, 1)[0]
            lam = torch.where(cutmix, lams["cutmix"], lams["mixup"])
        else:
            ((name, lam),) = lams.items()
            cutmix = torch.full((), name == "cutmix", device=draw.device)
        # CutMix's box (torchvision): a random center, half-sides int(0.5 * sqrt(1 - lam) * side)
        s = self.size
        cx, cy = draw.integers(0, s, 1)[0], draw.integers(0, s, 1)[0]
        half = torch.trunc(0.5 * torch.sqrt(1.0 - lam) * s).long()
        x1, y1 = (cx - half).clamp(min=0), (cy - half).clamp(min=0)
        x2, y2 = (cx + half).clamp(max=s), (cy + half).clamp(max=s)
        return MixParams(cutmix=cutmix, lam=lam, x1=x1, y1=y1, x2=x2, y2=y2)

    # ------------------------------------------------------------------ apply

    def _check(self, images: Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(f"policy is for (N, {self.channels}, {self.size}, {self.size}) "
                             f"images, got {tuple(images.shape)}")

    @A.full_precision
    def apply(self, images: Tensor, params: SupervisedParams) -> Tensor:
        """Per-image augmentation: uint8 or float ``(N, C, H, W)`` -> float32 in [0, 1].

        No mixing (that needs the labels): see :meth:`mix`.
        """
        self._check(images)
        x = A.to_float(images)
        if params.shift is not None:
            x = A.translate(x, params.shift.dy, params.shift.dx, params.flip,
                            self.translate_padding)
        elif params.box is not None:
            b = params.box
            x = A.resized_crop(x, b.top, b.left, b.height, b.width, params.flip)
        elif self.flip:
            x = torch.where(params.flip.reshape(-1, 1, 1, 1), x.flip(-1), x)
        if params.auto is not None:
            x = autoaugment.apply(x, params.auto.ops, params.auto.magnitudes)
        if params.erase is not None:
            e = params.erase
            x = A.erase(x, e.box.top, e.box.left, e.box.height, e.box.width,
                        self.erasing_value, e.apply)
        return x

    @A.full_precision
    def mix(self, images: Tensor, labels: Tensor, params: SupervisedParams
            ) -> tuple[Tensor, Tensor]:
        """MixUp/CutMix a batch; returns ``(images, targets)``.

        Targets are soft ``(N, num_classes)`` float32 when mixing is on, else the
        int64 labels as given (``cross_entropy`` takes both).
        """
        if params.mix is None:
            return images, labels
        m = params.mix
        n, _, h, w = images.shape
        index = torch.arange(n, device=images.device)
        partner = (index ^ 1).clamp(max=n - 1)  # (0, 1), (2, 3), ...; an odd last image: itself
        other = images[partner]
        rows = torch.arange(h, device=images.device).reshape(h, 1)
        cols = torch.arange(w, device=images.device).reshape(1, w)
        inside = (rows >= m.y1) & (rows < m.y2) & (cols >= m.x1) & (cols < m.x2)
        box_lam = 1.0 - (m.x2 - m.x1) * (m.y2 - m.y1) / float(h * w)
        lam = torch.where(m.cutmix, box_lam.to(images.dtype), m.lam.to(images.dtype))
        mixed_up = images * lam + other * (1.0 - lam)
        cut = torch.where(inside, other, images)
        out = torch.where(m.cutmix, cut, mixed_up)
        soft = nnf.one_hot(labels, self.num_classes).to(images.dtype)
        return out, soft * lam + soft[partner] * (1.0 - lam)

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator
                 ) -> tuple[Tensor, Tensor]:
        """Sample, apply and mix in one go (single process)."""
        params = self.sample(images.shape[0], generator, images.device)
        return self.mix(self.apply(images, params), labels, params)

