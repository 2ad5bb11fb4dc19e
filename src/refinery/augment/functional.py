"""Batched image ops with one parameter per image, defined as torchvision v2 defines them.

Every function takes float32 images ``(N, C, H, W)`` in ``[0, 1]`` (C = 1 or 3)
on any device and per-image parameters as tensors of shape ``(N,)`` on the same
device, and returns what ``torchvision.transforms.v2.functional.<op>`` returns
for each image with its own parameter (the tests check that image by image,
exactly or to float rounding). The torchvision functionals take one Python
number per call, so a batch through them gets one parameter for all images;
these get one per image, in a fixed number of kernels and with no host sync
(no ``.item()``, no boolean-mask indexing), so on a GPU they also run under
``torch.compile(fullgraph=True)`` or in a CUDA graph. The one data-dependent
step, :func:`where_chosen` on CPU, is where no sync can cost anything.

Float semantics throughout: an input that was uint8 is converted once with
:func:`to_float` (torchvision's ``ToDtype(float32, scale=True)``). torchvision
on uint8 tensors rounds back to uint8 after every op; the float path keeps the
extra precision, which is what training wants.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torchvision.transforms.v2 import functional as tvf

Method = TypeVar("Method", bound=Callable[..., Any])


def full_precision(method: Method) -> Method:
    """Run a policy method with autocast off, whatever context the caller is in.

    The training step runs under ``torch.autocast`` (bf16 on GPU), which would
    turn the convolutions and the affine grid's matrix product into bf16: an
    8-bit mantissa moves nearest-neighbour samples by whole pixels. The
    augmentation is defined in float32, so it opts out.
    """

    @functools.wraps(method)
    def wrapper(self: Any, images: Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(images.device.type, enabled=False):
            return method(self, images, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def to_float(images: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]`` exactly as ``ToDtype(float32, scale=True)``.

    Always a new contiguous tensor (never the caller's), so later steps may write into it.
    """
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255)
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {images.dtype}")
    return images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _rows(values: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, 1) so a per-image value broadcasts over its image."""
    return values.reshape(-1, 1, 1, 1)


def _blend(image1: Tensor, image2: Tensor, ratio: Tensor) -> Tensor:
    ratio = _rows(ratio.to(image1.dtype))
    return (image1 * ratio + image2 * (1.0 - ratio)).clamp_(0.0, 1.0)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Luma (ITU-R 601-2, torchvision's weights), ``(N, 1, H, W)``; a 1-channel input as is."""
    if images.shape[1] == 1:
        return images
    return tvf.rgb_to_grayscale(images, num_output_channels=1)


def grayscale(images: Tensor, apply: Tensor, *, inplace: bool = False) -> Tensor:
    """RandomGrayscale: images where ``apply`` become gray, keeping their channel count."""
    if images.shape[1] == 1:
        return images
    return where_chosen(images, apply, lambda x, i: rgb_to_grayscale(x).expand_as(x),
                        inplace=inplace)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    return (images * _rows(factor)).clamp_(0.0, 1.0)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    if images.shape[1] == 1:  # as torchvision (and PIL): saturation means nothing in gray
        return images
    return _blend(images, rgb_to_grayscale(images), factor)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def jitter_blend(images: Tensor, factor: Tensor, to_gray: Tensor, to_mean: Tensor) -> Tensor:
    """Brightness, contrast or saturation, each image its own, in one pass over the batch.

    ``clamp(factor * x + to_gray * gray(x) + to_mean * mean(gray(x)), 0, 1)`` per image:
    brightness with ``to_gray = to_mean = 0``, saturation with ``to_gray = 1 - factor``
    (and ``to_mean = 0``), contrast with ``to_mean = 1 - factor`` (and ``to_gray = 0``).
    The zero terms add exact zeros, so each image gets the very bits
    :func:`adjust_brightness`, :func:`adjust_saturation` or :func:`adjust_contrast`
    would give it; a colour jitter runs one of these per slot instead of all three.
    """
    gray = rgb_to_grayscale(images)
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    out = images * _rows(factor) + gray * _rows(to_gray)
    return out.add_(mean * _rows(to_mean)).clamp_(0.0, 1.0)


def adjust_sharpness(images: Tensor, factor: Tensor) -> Tensor:
    """Blend with the 3x3 smoothed image inside a 1-pixel border (torchvision/PIL's definition)."""
    _, c, h, w = images.shape
    if h <= 2 or w <= 2:
        return images
    # built on the device (no host -> device copy): 1/13 around a 5/13 center
    kernel = torch.full((c, 1, 3, 3), 1.0 / 13.0, dtype=images.dtype, device=images.device)
    kernel[:, :, 1, 1] = 5.0 / 13.0
    blurred = nnf.conv2d(images, kernel, groups=c)
    inner = images[..., 1:-1, 1:-1]
    output = images.clone()
    output[..., 1:-1, 1:-1] = inner + (blurred - inner) * _rows(1.0 - factor.to(images.dtype))
    return output.clamp_(0.0, 1.0)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate hue by ``factor`` (in turns, [-0.5, 0.5]); gray input as is.

    torchvision's definition (HSV hue shift, value and saturation kept),
    written in the chroma form: with ``M, m`` the max and min channel and the
    hue ``h6`` in sixths, channel ``n`` (5, 3, 1 for R, G, B) of the result is
    ``M - (M - m) * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h6) mod 6``.
    That is the same piecewise-linear map as torchvision's RGB -> HSV -> RGB
    round trip in about half the kernels; the two differ by float rounding
    (< 2e-6, checked by the tests).
    """
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma == 0, 1.0, chroma)
    # the hue sector as torchvision picks it: red wins ties, then green
    h6 = torch.where(maxc == r, (g - b) / safe,
                     torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h6 = h6.add_(factor.to(images.dtype).reshape(-1, 1, 1) * 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder_(6.0)
        channels.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1)


def posterize(images: Tensor, bits: Tensor) -> Tensor:
    """Keep ``bits`` (int, 0..8) bits per value: torchvision's float definition."""
    levels = _rows(torch.pow(2.0, bits.to(images.dtype)))
    return torch.minimum(images.mul(levels).floor_().clamp_(min=0.0), levels - 1).div_(levels)


def solarize(images: Tensor, threshold: Tensor) -> Tensor:
    """Invert values at or above ``threshold`` (on the 0..1 scale)."""
    return torch.where(images >= _rows(threshold.to(images.dtype)), 1.0 - images, images)


def autocontrast(images: Tensor) -> Tensor:
    """Stretch each channel of each image to [0, 1]; flat channels are kept."""
    minimum = images.amin(dim=(-2, -1), keepdim=True)
    maximum = images.amax(dim=(-2, -1), keepdim=True)
    flat = maximum == minimum
    inv_scale = torch.where(flat, torch.ones_like(maximum), maximum - minimum)
    minimum = torch.where(flat, torch.zeros_like(minimum), minimum)
    return (images - minimum).div_(inv_scale).clamp_(0.0, 1.0)


def equalize(images: Tensor) -> Tensor:
    """Histogram equalization per channel: torchvision's own kernel, which is already batched."""
    return tvf.equalize(images)


def gaussian_blur(images: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Gaussian blur with one sigma per image, as ``gaussian_blur(img, [k, k], [s, s])``.

    The same separable kernel torchvision builds (softmax of the squared
    offsets), applied as two 1-D grouped convolutions over the ``N * C``
    planes after reflect padding; torchvision convolves once with the outer
    product, so the two differ only by float rounding.
    """
    n, c, h, w = images.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=images.dtype, device=images.device)
    kernel = torch.softmax(-(x / sigma.to(images.dtype).reshape(-1, 1)).pow(2), dim=1)  # (N, k)
    kernel = kernel.repeat_interleave(c, dim=0)  # one row per (image, channel) plane
    pad = kernel_size // 2
    planes = nnf.pad(images.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    planes = nnf.conv2d(planes, kernel.reshape(n * c, 1, 1, kernel_size), groups=n * c)
    planes = nnf.conv2d(planes, kernel.reshape(n * c, 1, kernel_size, 1), groups=n * c)
    return planes.reshape(n, c, h, w)


def erase(images: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor,
          value: Tensor | tuple[float, ...], apply: Tensor) -> Tensor:
    """RandomErasing's box fill, one box per image, as coordinate masks (no indexing loop).

    ``value``: the fill per channel (a tensor, or floats, filled on the device without a
    host -> device copy).
    """
    if not isinstance(value, Tensor):
        value = torch.stack([torch.full((), v, dtype=images.dtype, device=images.device)
                             for v in value])
    _, _, h, w = images.shape
    rows = torch.arange(h, device=images.device).reshape(1, h)
    cols = torch.arange(w, device=images.device).reshape(1, w)
    in_rows = (rows >= top.reshape(-1, 1)) & (rows < (top + height).reshape(-1, 1))
    in_cols = (cols >= left.reshape(-1, 1)) & (cols < (left + width).reshape(-1, 1))
    box = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)) & apply.reshape(-1, 1, 1)
    return torch.where(box.unsqueeze(1), value.to(images.dtype).reshape(1, -1, 1, 1), images)


# ----------------------------------------------------------------------- geometry


def _take_rows(images: Tensor, rows: Tensor) -> Tensor:
    """``out[n, c, i, :] = images[n, c, rows[n, i], :]``: whole rows, one ``index_select``.

    (A ``gather`` along the row dimension does the same one element at a time,
    about ten times slower on CPU.)
    """
    n, c, h, w = images.shape
    planes = torch.arange(n * c, device=images.device).reshape(n, c, 1) * h
    index = (planes + rows.reshape(n, 1, -1)).reshape(-1)
    return images.reshape(n * c * h, w).index_select(0, index).reshape(n, c, -1, w)


def _take_cols(images: Tensor, cols: Tensor) -> Tensor:
    """``out[n, c, i, j] = images[n, c, i, cols[n, j]]`` (a gather along the last dimension)."""
    n, c, h, _ = images.shape
    return images.gather(3, cols.reshape(n, 1, 1, -1).expand(n, c, h, cols.shape[1]))


def _reflect(index: Tensor, size: int) -> Tensor:
    """Reflect-pad index map (no edge repeat, as ``torch.nn.functional.pad(mode="reflect")``)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def translate(images: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: str) -> Tensor:
    """Pad-and-random-crop as an integer shift per image, then an optional horizontal flip.

    Equals ``horizontal_flip(crop(pad(img, p, padding_mode), p + dy, p + dx, H, W))`` for
    ``padding`` "reflect" or "zeros" (torchvision's "constant" with fill 0);
    |dy|, |dx| must be smaller than the image side.
    """
    _, _, h, w = images.shape
    rows = torch.arange(h, device=images.device).reshape(1, h) + dy.reshape(-1, 1)
    cols = torch.arange(w, device=images.device).reshape(1, w)
    cols = torch.where(flip.reshape(-1, 1), w - 1 - cols, cols) + dx.reshape(-1, 1)
    if padding == "reflect":
        return _take_cols(_take_rows(images, _reflect(rows, h)), _reflect(cols, w))
    inside = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)
    shifted = _take_cols(_take_rows(images, rows.clamp(0, h - 1)), cols.clamp(0, w - 1))
    return shifted * inside.unsqueeze(1).to(images.dtype)


def _linear_taps(start: Tensor, length: Tensor, out_size: int, flip: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Source pixels and weights of ``interpolate(mode="bilinear", align_corners=False)``.

    For a crop ``[start, start + length)`` resized to ``out_size`` (never larger
    than the crop's source, so antialiasing has nothing to do): the source
    coordinate of output ``i`` is ``(i + 0.5) * length / out_size - 0.5``,
    clamped to the crop as ``interpolate`` clamps to its input.
    """
    dst = torch.arange(out_size, device=start.device, dtype=torch.float32).reshape(1, -1)
    if flip is not None:
        dst = torch.where(flip.reshape(-1, 1), out_size - 1 - dst, dst)
    length_f = length.to(torch.float32).reshape(-1, 1)
    src = ((dst + 0.5) * (length_f / out_size) - 0.5).clamp_(min=0.0)
    low = src.floor()
    frac = src - low
    low = low.long()
    high = torch.minimum(low + 1, length.reshape(-1, 1) - 1)
    low = torch.minimum(low, length.reshape(-1, 1) - 1)
    offset = start.reshape(-1, 1)
    return low + offset, high + offset, frac


def resized_crop(images: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor,
                 flip: Tensor | None = None) -> Tensor:
    """RandomResizedCrop's crop + bilinear resize back to the input size, one box per image.

    Equals ``resized_crop(img, top, left, h, w, [H, W], BILINEAR, antialias=True)`` (then
    ``horizontal_flip`` where ``flip``) up to float rounding; boxes lie inside the image.
    Separable: rows are interpolated first, then columns, each from two whole-row/column gathers.
    """
    n, _, h, w = images.shape
    y0, y1, fy = _linear_taps(top, height, h, None)
    x0, x1, fx = _linear_taps(left, width, w, flip)
    rows0, rows1 = _take_rows(images, y0), _take_rows(images, y1)
    mixed = rows0 + (rows1 - rows0) * fy.reshape(n, 1, h, 1)
    cols0, cols1 = _take_cols(mixed, x0), _take_cols(mixed, x1)
    return cols0 + (cols1 - cols0) * fx.reshape(n, 1, 1, w)


def inverse_affine_matrix(center: Tensor, angle: Tensor, translate: Tensor, scale: Tensor,
                          shear: Tensor) -> Tensor:
    """Per-image ``_get_inverse_affine_matrix`` of torchvision, ``(N, 2, 3)`` float64.

    Arguments as torchvision's (degrees, pixels, center relative to the image
    center), each with a leading image dimension: ``center``, ``translate`` and
    ``shear`` ``(N, 2)``, ``angle`` and ``scale`` ``(N,)``. Computed in float64
    as torchvision computes it in Python floats.
    """
    center, angle, translate, scale, shear = (
        t.to(torch.float64) for t in (center, angle, translate, scale, shear))
    rot = torch.deg2rad(angle)
    sx, sy = torch.deg2rad(shear).unbind(1)
    cx, cy = center.unbind(1)
    tx, ty = translate.unbind(1)
    cos_sy = torch.cos(sy)
    tan_sx = torch.tan(sx)
    rot_minus_sy = rot - sy
    cx_plus_tx, cy_plus_ty = cx + tx, cy + ty
    a = torch.cos(rot_minus_sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot_minus_sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    m2 = cx - m0 * cx_plus_tx - m1 * cy_plus_ty
    m5 = cy - m3 * cx_plus_tx - m4 * cy_plus_ty
    return torch.stack((m0, m1, m2, m3, m4, m5), dim=1).reshape(-1, 2, 3)


def affine(images: Tensor, matrix: Tensor, mode: str = "nearest") -> Tensor:
    """Warp each image by its inverse affine ``matrix`` (N, 2, 3), zeros outside.

    torchvision's ``_affine_grid`` + ``grid_sample`` with a batch of matrices
    instead of one (``fill=None``: zero padding); ``mode`` "nearest" or "bilinear".
    The sampling grid is computed with the same float32 arithmetic, so nearest
    sampling picks the same pixels (checked exactly by the tests).
    """
    n, _, h, w = images.shape
    theta = matrix.to(images.dtype)
    base = torch.empty(1, h, w, 3, dtype=images.dtype, device=images.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w,
                                      device=images.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h,
                                      device=images.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2)  # (N, 3, 2), columns scaled to grid units
    rescaled = torch.cat((rescaled[..., :1] / (0.5 * w), rescaled[..., 1:] / (0.5 * h)), dim=2)
    # all images' grids in one (H*W, 3) @ (3, N*2) product (a batched bmm of tiny matrices is
    # several times slower on CPU); each entry is the same 3-term dot product as torchvision's
    grid = base.reshape(h * w, 3).mm(rescaled.permute(1, 0, 2).reshape(3, n * 2))
    grid = grid.reshape(h, w, n, 2).permute(2, 0, 1, 3)
    return nnf.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


# ---------------------------------------------------------------------- selection

PerImageOp = Callable[[Tensor, Tensor | None], Tensor]

#: Run selected ops on the chosen subset when on CPU (see :func:`where_chosen`). The
#: tests turn it off to run the accelerator's whole-batch path on CPU.
SUBSETS_ON_CPU = True


def pick(values: Tensor, index: Tensor | None) -> Tensor:
    """The rows of a per-image parameter for the images an op runs on (all if ``index`` is None)."""
    return values if index is None else values[index]


def where_chosen(images: Tensor, chosen: Tensor, op: PerImageOp, *, inplace: bool = False
                 ) -> Tensor:
    """``op`` applied to the images where ``chosen`` (N,) is True, the others unchanged.

    ``op(subset, index)`` gets the images and the row index of their
    parameters (``None``: the whole batch, see :func:`pick`). On an
    accelerator the op runs on the whole batch and ``torch.where`` keeps the
    chosen results: gathering the chosen images would need their count on the
    host, a sync per op. On CPU there is no sync to avoid, so the op runs on the
    chosen images only (a fraction of the work when ops are spread over the
    batch), written into ``images`` itself when ``inplace``; both give the same
    result, image by image.
    """
    if images.device.type != "cpu" or not SUBSETS_ON_CPU:
        return torch.where(chosen.reshape(-1, 1, 1, 1), op(images, None), images)
    index = torch.nonzero(chosen).flatten()
    if index.numel() == 0:
        return images
    out = images if inplace else images.clone()
    out[index] = op(images[index], index)
    return out
