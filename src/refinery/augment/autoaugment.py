"""RandAugment and TrivialAugmentWide with one op and magnitude per image.

The op set, the magnitude tables and the op definitions are torchvision v2's
(``RandAugment`` and ``TrivialAugmentWide``, ``num_magnitude_bins=31``,
nearest interpolation, zero fill). torchvision draws one op for a whole call;
here every image draws its own, and the executor loops over the 14 ops (not
over images): each op is computed for the batch and kept where the image drew
it (``torch.where``), because gathering the images that drew an op needs a
data-dependent size, i.e. a host sync per op on CUDA. The five geometric ops
share one batched affine warp (one matrix per image), so a layer costs one
``grid_sample`` plus the photometric ops.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from refinery.augment import functional as A
from refinery.augment.batch import Draw

NUM_BINS = 31

#: torchvision's op order (the keys of ``RandAugment._AUGMENTATION_SPACE``).
OPS: tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                    "Color", "Contrast", "Sharpness"})
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
OP_INDEX = {name: i for i, name in enumerate(OPS)}

MagnitudeFn = Callable[[int, int, int], Tensor | None]


def _posterize_bins(span: int) -> MagnitudeFn:
    return lambda bins, h, w: (8 - (torch.arange(bins) / ((bins - 1) / span))).round().int()


def _linspace(end: float) -> MagnitudeFn:
    return lambda bins, h, w: torch.linspace(0.0, end, bins)


_NONE: MagnitudeFn = lambda bins, h, w: None  # noqa: E731

# Copied from torchvision 0.29 ``_auto_augment.py`` (the tests compare op by op).
SPACES: dict[str, dict[str, MagnitudeFn]] = {
    "randaugment": {
        "Identity": _NONE,
        "ShearX": _linspace(0.3),
        "ShearY": _linspace(0.3),
        "TranslateX": lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, bins),
        "TranslateY": lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, bins),
        "Rotate": _linspace(30.0),
        "Brightness": _linspace(0.9),
        "Color": _linspace(0.9),
        "Contrast": _linspace(0.9),
        "Sharpness": _linspace(0.9),
        "Posterize": _posterize_bins(4),
        "Solarize": lambda bins, h, w: torch.linspace(1.0, 0.0, bins),
        "AutoContrast": _NONE,
        "Equalize": _NONE,
    },
    "trivialaugment": {
        "Identity": _NONE,
        "ShearX": _linspace(0.99),
        "ShearY": _linspace(0.99),
        "TranslateX": _linspace(32.0),
        "TranslateY": _linspace(32.0),
        "Rotate": _linspace(135.0),
        "Brightness": _linspace(0.99),
        "Color": _linspace(0.99),
        "Contrast": _linspace(0.99),
        "Sharpness": _linspace(0.99),
        "Posterize": _posterize_bins(6),
        "Solarize": lambda bins, h, w: torch.linspace(1.0, 0.0, bins),
        "AutoContrast": _NONE,
        "Equalize": _NONE,
    },
}


@functools.lru_cache(maxsize=32)
def _table(kind: str, height: int, width: int, device: torch.device) -> Tensor:
    """(ops, bins) float32 magnitudes; 0 for ops without one. Cached per device."""
    rows = []
    for name in OPS:
        values = SPACES[kind][name](NUM_BINS, height, width)
        rows.append(torch.zeros(NUM_BINS) if values is None else values.to(torch.float32))
    return torch.stack(rows).to(device)


@functools.lru_cache(maxsize=8)
def _signed(device: torch.device) -> Tensor:
    return torch.tensor([name in SIGNED for name in OPS], device=device)


def sample(draw: Draw, n: int, kind: str, layers: int, magnitude: int | None,
           height: int, width: int) -> tuple[Tensor, Tensor]:
    """Per-image ``(op, magnitude)`` of shape ``(n, layers)``, as torchvision draws them.

    RandAugment: ``layers`` uniform ops at the fixed ``magnitude`` bin;
    TrivialAugmentWide: one uniform op at a uniform bin. Signed ops flip sign
    with probability 1/2.
    """
    device = draw.generator.device
    ops = torch.randint(len(OPS), (n, layers), generator=draw.generator, device=device)
    if magnitude is None:
        bins = torch.randint(NUM_BINS, (n, layers), generator=draw.generator, device=device)
    else:
        bins = torch.full((n, layers), magnitude, device=device)
    negate = torch.rand((n, layers), generator=draw.generator, device=device) <= 0.5
    values = _table(kind, height, width, device)[ops, bins]
    values = torch.where(negate & _signed(device)[ops], -values, values)
    return draw.place(ops), draw.place(values)


def _geometric_matrices(op: Tensor, magnitude: Tensor, height: int, width: int) -> Tensor:
    """One inverse affine matrix per image for the five geometric ops (identity otherwise).

    Each op's arguments exactly as torchvision passes them to ``affine``/``rotate``:
    shears about the top-left corner with angle ``atan(m)``, translations by
    ``int(m)`` pixels, rotation by ``-(m % 360)`` about the center.
    """
    mag = magnitude.to(torch.float64)
    zero = torch.zeros_like(mag)
    shear_deg = torch.rad2deg(torch.atan(mag))
    is_op = {name: op == OP_INDEX[name] for name in GEOMETRIC}
    shear = torch.stack((torch.where(is_op["ShearX"], shear_deg, zero),
                         torch.where(is_op["ShearY"], shear_deg, zero)), dim=1)
    translate = torch.stack((torch.where(is_op["TranslateX"], torch.trunc(mag), zero),
                             torch.where(is_op["TranslateY"], torch.trunc(mag), zero)), dim=1)
    angle = torch.where(is_op["Rotate"], -torch.remainder(mag, 360.0), zero)
    sheared = is_op["ShearX"] | is_op["ShearY"]
    center = torch.stack((torch.where(sheared, -0.5 * width, zero),
                          torch.where(sheared, -0.5 * height, zero)), dim=1)
    return A.inverse_affine_matrix(center, angle, translate, torch.ones_like(mag), shear)


def _photometric(magnitude: Tensor, channels: int) -> dict[str, A.PerImageOp]:
    """The non-geometric ops, each as ``op(images, index)`` over its images' magnitudes."""
    factor = 1.0 + magnitude
    ops: dict[str, A.PerImageOp] = {
        "Brightness": lambda x, i: A.adjust_brightness(x, A.pick(factor, i)),
        "Contrast": lambda x, i: A.adjust_contrast(x, A.pick(factor, i)),
        "Sharpness": lambda x, i: A.adjust_sharpness(x, A.pick(factor, i)),
        "Posterize": lambda x, i: A.posterize(x, A.pick(magnitude, i).long()),
        "Solarize": lambda x, i: A.solarize(x, A.pick(magnitude, i)),
        "AutoContrast": lambda x, i: A.autocontrast(x),
        "Equalize": lambda x, i: A.equalize(x),
    }
    if channels == 3:  # Color (saturation) is the identity on gray images
        ops["Color"] = lambda x, i: A.adjust_saturation(x, A.pick(factor, i))
    return ops


def apply_layer(images: Tensor, op: Tensor, magnitude: Tensor, *, inplace: bool = False
                ) -> Tensor:
    """One layer: image ``i`` gets op ``op[i]`` at ``magnitude[i]`` (float images in [0, 1]).

    Every image draws exactly one op, so the ops touch disjoint sets of images
    and can be applied one after the other to the same batch (``inplace``: on
    CPU, written into ``images``).
    """
    _, c, h, w = images.shape
    geometric = torch.zeros_like(op, dtype=torch.bool)
    for name in GEOMETRIC:
        geometric |= op == OP_INDEX[name]
    matrices = _geometric_matrices(op, magnitude, h, w)
    out = A.where_chosen(images, geometric, lambda x, i: A.affine(x, A.pick(matrices, i)),
                         inplace=inplace)
    for name, compute in _photometric(magnitude, c).items():
        out = A.where_chosen(out, op == OP_INDEX[name], compute, inplace=inplace)
    return out


def apply(images: Tensor, ops: Tensor, magnitudes: Tensor) -> Tensor:
    """Apply every layer in turn (``ops``/``magnitudes`` of shape ``(N, layers)``); a new tensor."""
    out = images.clone()
    for layer in range(ops.shape[1]):
        out = apply_layer(out, ops[:, layer], magnitudes[:, layer], inplace=True)
    return out


def max_translate_px(kind: str, height: int, width: int) -> int:
    """Largest translation in pixels the space can draw (the stage warns when it empties images)."""
    table = _table(kind, height, width, torch.device("cpu"))
    return math.floor(float(table[OP_INDEX["TranslateX"]].max()))
