"""The raw data layout that every source is brought into by ``download``.

One layout for every source, so ``validate`` and ``prepare`` never care where
the images came from::

    data/raw/
      dataset.json   source, kind ("files" or "arrays"), classes, splits, checksums
      records.csv    one row per image: id, split, class_id, class_name, location
      files/...      kind "files": the archive's image files, untouched
      arrays/<split>.npy   kind "arrays": uint8 (N, H, W, C) pixel arrays

``location`` is a path relative to ``data/raw`` for files
(``files/train/cat/0001.jpg``) or ``arrays/<split>.npy#<row>`` for arrays.
Splits are always named ``train`` and ``test`` here, whatever the source
folders were called; ``dataset.json`` records the original names.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FORMAT_VERSION = 1
SPLITS = ("train", "test")
RECORD_COLUMNS = ("id", "split", "class_id", "class_name", "location")


class UndecodableImage(ValueError):
    """An image file that PIL cannot decode (truncated, not an image, ...)."""


@dataclass(frozen=True)
class DecodedImage:
    """A source image as decoded, before conversion to the pipeline's shape."""

    image: Any  # PIL.Image.Image, fully loaded
    width: int
    height: int
    mode: str
    nbytes: int  # bytes of the encoded file, or of the pixel array


@dataclass
class RawDataset:
    root: Path
    meta: dict[str, Any]
    records: pd.DataFrame

    @classmethod
    def load(cls, root: str | Path) -> RawDataset:
        root = Path(root)
        meta = json.loads((root / "dataset.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{root}/dataset.json: unsupported raw format {meta.get('format')!r}")
        records = pd.read_csv(
            root / "records.csv",
            dtype={"id": str, "split": str, "class_id": "int64", "class_name": str,
                   "location": str},
            keep_default_na=False,
        )
        return cls(root=root, meta=meta, records=records)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        return {}

    def array(self, name: str) -> np.ndarray:
        """Memory-mapped pixel array ``arrays/<name>``; loaded once per process."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.root / name, mmap_mode="r")
        return self._arrays[name]

    def decode(self, location: str) -> DecodedImage:
        """Decode one record; raise :class:`UndecodableImage` if it is not a readable image."""
        from PIL import Image, UnidentifiedImageError

        if "#" in location:
            name, _, row = location.partition("#")
            pixels = np.asarray(self.array(name)[int(row)])
            mode = "L" if pixels.shape[-1] == 1 else "RGB"
            image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode)
            return DecodedImage(image, image.width, image.height, mode, int(pixels.nbytes))
        path = self.root / location
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                image = opened.copy() if opened.mode != "P" else opened.convert("RGBA")
                mode = opened.mode
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UndecodableImage(f"{location}: {exc}") from None
        return DecodedImage(image, image.width, image.height, mode, len(data))


def to_pixels(image: Any, size: int, channels: int, resize: str = "crop") -> np.ndarray:
    """Convert a decoded image of any size and mode to ``(size, size, channels)`` uint8.

    Modes with alpha are composited on black (what a model would see of a
    transparent area is arbitrary; black is the common convention); CMYK,
    palette, 16-bit and float modes go through PIL's own conversions.
    """
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.max() > 0 else 1.0
        image = Image.fromarray((array / top * 255.0).round().astype(np.uint8), mode="L")
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        if resize == "crop":
            scale = size / min(image.size)
            new = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
            image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels


def write_records(root: Path, records: pd.DataFrame) -> None:
    """Write ``records.csv`` in the canonical column order (caller owns atomicity of ``root``)."""
    missing = set(RECORD_COLUMNS) - set(records.columns)
    if missing:
        raise ValueError(f"records lack columns {sorted(missing)}")
    records.loc[:, list(RECORD_COLUMNS)].to_csv(root / "records.csv", index=False)


def write_meta(root: Path, meta: dict[str, Any]) -> None:
    meta = {"format": FORMAT_VERSION, **meta}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
