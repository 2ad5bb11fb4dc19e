"""The preview grid: what the policies do to real training images, for a human to look at.

One row per image (cycling through the classes), labelled with its class:
the original, then supervised views, then SSL view pairs. MixUp/CutMix are
left out: they mix pairs of a batch, not one image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from refinery.augment.selfsup import SslPolicy
from refinery.augment.supervised import SupervisedPolicy

TILE_PX = 64  # tiles are upscaled (nearest) to about this many pixels


def pick_rows(labels: Tensor, rows: int, num_classes: int) -> list[int]:
    """Indices of ``rows`` images, class 0, 1, ..., k-1, 0, 1, ... (first unused of each)."""
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in range(num_classes)]
    picked: list[int] = []
    depth = 0
    while len(picked) < rows and any(depth < len(ids) for ids in per_class):
        for ids in per_class:
            if depth < len(ids) and len(picked) < rows:
                picked.append(ids[depth])
        depth += 1
    return picked


def _mosaic(tiles: Tensor, gap: int = 2) -> Tensor:
    """(rows, cols, C, H, W) float in [0, 1] -> (H', W', C) with white gaps."""
    rows, cols, c, h, w = tiles.shape
    out = torch.ones(c, rows * (h + gap) - gap, cols * (w + gap) - gap)
    for r in range(rows):
        for k in range(cols):
            out[:, r * (h + gap): r * (h + gap) + h, k * (w + gap): k * (w + gap) + w] = tiles[r, k]
    return out.permute(1, 2, 0)


def render(supervised: SupervisedPolicy, ssl: SslPolicy, images: Tensor, captions: list[str],
           generator: torch.Generator, path: Path, views: int = 4, pairs: int = 2) -> Path:
    """Write the grid for ``images`` (uint8 ``(K, C, H, W)``) to ``path`` (PNG)."""
    k = images.shape[0]
    original = images.to(torch.float32) / 255.0
    sup_params = supervised.sample(k * views, generator)
    sup = supervised.apply(images.repeat_interleave(views, 0), sup_params).reshape(
        k, views, *images.shape[1:])
    first, second = ssl(images.repeat_interleave(pairs, 0), generator)
    pair_views = torch.stack((first, second), dim=1).reshape(k, 2 * pairs, *images.shape[1:])
    tiles = torch.cat((original.unsqueeze(1), sup, pair_views), dim=1)
    scale = max(1, TILE_PX // images.shape[-1])
    tiles = tiles.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    mosaic = _mosaic(tiles)
    columns = (["original"] + [f"supervised {i + 1}" for i in range(views)]
               + [f"SSL {i // 2 + 1}{'ab'[i % 2]}" for i in range(2 * pairs)])

    tile = tiles.shape[-1] + 2
    fig = Figure(figsize=(1.2 + 0.9 * len(columns), 0.6 + 0.9 * k), dpi=100)
    ax = fig.add_subplot()
    gray = mosaic.shape[2] == 1
    ax.imshow(mosaic.squeeze(2).numpy() if gray else mosaic.numpy(),
              cmap="gray" if gray else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([tile * i + tile / 2 - 1 for i in range(len(columns))], columns,
                  rotation=45, ha="left", fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([tile * i + tile / 2 - 1 for i in range(k)], captions, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
