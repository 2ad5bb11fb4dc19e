"""Image corruptions at fixed severities, for robustness numbers.

All take and return float images in ``[0, 1]``, shape ``(N, C, H, W)``, on
any device, and are deterministic: the only random one (Gaussian noise) draws
from a CPU generator seeded by the caller, so every model is scored on the
very same corrupted images. Where a severity has a neutral value (noise std 0,
blur sigma 0, brightness shift 0, contrast factor 1) the corruption returns
the input unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from refinery.params import CorruptionParams


def gaussian_noise(images: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """Add N(0, std^2) noise per pixel (0..1 scale), then clip."""
    if std == 0:
        return images
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    return (images + std * noise.to(images.device, images.dtype)).clamp_(0.0, 1.0)


def _gaussian_kernel(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))  # +-3 sigma holds 99.7% of the weight
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (kernel / kernel.sum()).to(dtype)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, per channel, with edge replication at the border.

    Replication rather than reflection: it works for any radius, even one
    larger than an 8x8 image.
    """
    if sigma == 0:
        return images
    channels = images.shape[1]
    kernel = _gaussian_kernel(sigma, images.device, images.dtype)
    radius = kernel.numel() // 2
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, horizontal, groups=channels)
    out = F.conv2d(out, vertical, groups=channels)
    return out.clamp_(0.0, 1.0)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Re-encode each image as JPEG at ``quality`` (libjpeg via torchvision) and decode."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {quality}")
    as_uint8 = images.detach().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu()
    encoded = encode_jpeg(list(as_uint8), quality=quality)
    decoded = decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED)
    return torch.stack(decoded).to(images.device, images.dtype).div_(255.0)


def brightness(images: torch.Tensor, shift: float) -> torch.Tensor:
    """Add ``shift`` to every pixel (0..1 scale), then clip."""
    if shift == 0:
        return images
    return (images + shift).clamp_(0.0, 1.0)


def contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale each image's deviation from its own mean intensity by ``factor``, then clip.

    The mean is over all of the image's pixels and channels, so colours keep
    their balance; ``factor < 1`` flattens the image toward grey.
    """
    if factor == 1:
        return images
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * factor + mean).clamp_(0.0, 1.0)


Corruption = Callable[[torch.Tensor, CorruptionParams, int], torch.Tensor]

#: name -> corruption at the severity set in ``evaluate.corruptions``; the int is a seed.
CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": lambda x, p, seed: gaussian_noise(x, p.gaussian_noise_std, seed),
    "gaussian_blur": lambda x, p, seed: gaussian_blur(x, p.blur_sigma),
    "jpeg": lambda x, p, seed: jpeg(x, p.jpeg_quality),
    "brightness": lambda x, p, seed: brightness(x, p.brightness),
    "contrast": lambda x, p, seed: contrast(x, p.contrast),
}


def corrupt(name: str, images: torch.Tensor, params: CorruptionParams, seed: int) -> torch.Tensor:
    """Apply the named corruption at its configured severity."""
    try:
        corruption = CORRUPTIONS[name]
    except KeyError:
        raise ValueError(f"unknown corruption {name!r}; expected one of {list(CORRUPTIONS)}") \
            from None
    return corruption(images, params, seed)
