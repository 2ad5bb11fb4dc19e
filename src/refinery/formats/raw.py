"""The raw data layout that every source is brought into by ``download``.

One layout for every source, so ``validate`` and ``prepare`` never care where
the images came from::

    data/raw/
      dataset.json   source, kind ("packed", "arrays" or "files"), classes, splits, checksums
      records.csv    one row per image: id, split, class_id, class_name, location, source_path
      images.bin     kind "packed": the archive's image files, untouched, one after another
      arrays/<split>.npy   kind "arrays": uint8 (N, H, W, C) pixel arrays
      files/...      kind "files": the archive's image files, untouched, one per image

``location`` says where a record's image is, relative to ``data/raw``:

* ``images.bin#<offset>+<length>``: bytes ``[offset, offset + length)`` of the
  blob are one encoded image file, exactly as the archive held it;
* ``arrays/<split>.npy#<row>``: one row of a pixel array;
* ``files/train/cat/0001.jpg`` (no ``#``): a file of its own.

A ``#`` followed by one number is an array row, by ``<number>+<number>`` a
byte range, so the forms cannot be mistaken for each other. Image folders are
packed rather than kept as files because 60k small files cost more to create
(and for DVC to hash and cache) than the whole archive costs to decompress.
The ``files`` kind still loads and decodes (other tools may write it).

``source_path`` is where the record came from in the source archive
(``cifar10-jpeg/train/cat/0001.jpg``, ``cifar-10-batches-bin/test_batch.bin#17``),
``""`` where there is none (builtin data, or a records.csv written before
the column existed: :meth:`RawDataset.load` fills it in).

Splits are always named ``train`` and ``test`` here, whatever the source
folders were called; ``dataset.json`` records the original names.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

FORMAT_VERSION = 1
SPLITS = ("train", "test")
KINDS = ("packed", "arrays", "files")
PACKED_BLOB = "images.bin"
RECORD_COLUMNS = ("id", "split", "class_id", "class_name", "location", "source_path")
#: Columns a records.csv must have; the others default to "" (written before they existed).
REQUIRED_COLUMNS = ("id", "split", "class_id", "class_name", "location")
_REF = re.compile(r"(\d+)(?:\+(\d+))?")


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


@dataclass(frozen=True)
class Location:
    """A parsed ``location``: which kind of storage, which file, and where in it."""

    kind: Literal["packed", "arrays", "files"]
    path: str  # relative to the raw root
    row: int = 0  # arrays
    offset: int = 0  # packed
    length: int = 0  # packed


def packed_location(offset: int, length: int, blob: str = PACKED_BLOB) -> str:
    """The ``location`` of ``length`` bytes at ``offset`` of the blob."""
    return f"{blob}#{offset}+{length}"


def parse_location(location: str) -> Location:
    """Tell the three location forms apart (see the module doc); refuse anything else."""
    path, sep, ref = location.partition("#")
    if not sep:
        return Location("files", location)
    match = _REF.fullmatch(ref)
    if not match or not path:
        raise ValueError(f"{location!r}: not a raw record location (expected "
                         "<file>, <array>.npy#<row> or <blob>#<offset>+<length>)")
    if match.group(2) is None:
        return Location("arrays", path, row=int(match.group(1)))
    return Location("packed", path, offset=int(match.group(1)), length=int(match.group(2)))


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
                   "location": str, "source_path": str},
            keep_default_na=False,
        )
        for column in RECORD_COLUMNS:
            if column not in records.columns and column not in REQUIRED_COLUMNS:
                records[column] = ""
        return cls(root=root, meta=meta, records=records)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the open maps: a worker process opens its own, lazily."""
        return {key: value for key, value in self.__dict__.items()
                if key not in ("_arrays", "_blobs")}

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        return {}

    @cached_property
    def _blobs(self) -> dict[str, mmap.mmap | bytes]:
        return {}

    def array(self, name: str) -> np.ndarray:
        """Memory-mapped pixel array ``arrays/<name>``; loaded once per process."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.root / name, mmap_mode="r")
        return self._arrays[name]

    def blob(self, name: str = PACKED_BLOB) -> mmap.mmap | bytes:
        """Read-only memory map of the packed blob ``name``; opened once per process.

        Mapped rather than read: workers of a pool share the page cache
        instead of each holding a copy, and a record costs one slice.
        """
        if name not in self._blobs:
            with open(self.root / name, "rb") as fh:
                empty = os.fstat(fh.fileno()).st_size == 0  # mmap refuses empty files
                self._blobs[name] = b"" if empty else mmap.mmap(fh.fileno(), 0,
                                                                access=mmap.ACCESS_READ)
        return self._blobs[name]

    def read_bytes(self, location: str) -> bytes:
        """The encoded bytes of a ``packed`` or ``files`` record, exactly as the source held them.

        Raises :class:`UndecodableImage` for a byte range past the end of the
        blob (the records and the blob disagree), :class:`ValueError` for an
        array record (it has pixels, not an encoded file).
        """
        where = parse_location(location)
        if where.kind == "files":
            return (self.root / where.path).read_bytes()
        if where.kind == "arrays":
            raise ValueError(f"{location}: an array row has no encoded bytes; use decode()")
        blob = self.blob(where.path)
        end = where.offset + where.length
        if end > len(blob):
            raise UndecodableImage(f"{location}: past the end of {where.path} "
                                   f"({len(blob)} bytes)")
        return blob[where.offset:end]

    def encoded_size(self, location: str) -> int:
        """Bytes of the record's encoded file without reading it; 0 for a missing file or array."""
        where = parse_location(location)
        if where.kind == "packed":
            return where.length
        if where.kind == "arrays":
            return 0
        try:
            return (self.root / where.path).stat().st_size
        except OSError:
            return 0

    def decode(self, location: str) -> DecodedImage:
        """Decode one record; raise :class:`UndecodableImage` if it is not a readable image."""
        where = parse_location(location)
        if where.kind == "arrays":
            return self._decode_row(where)
        return _decode_encoded(self.read_bytes(location), location)

    def _decode_row(self, where: Location) -> DecodedImage:
        from PIL import Image

        pixels = np.asarray(self.array(where.path)[where.row])
        mode = "L" if pixels.shape[-1] == 1 else "RGB"
        image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode)
        return DecodedImage(image, image.width, image.height, mode, int(pixels.nbytes))


def _decode_encoded(data: bytes, location: str) -> DecodedImage:
    """Decode an image file's bytes with PIL, fully (lazy loading would hide truncation)."""
    from PIL import Image, UnidentifiedImageError

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
    """Write ``records.csv`` in the canonical column order (caller owns atomicity of ``root``).

    Optional columns the frame lacks (``source_path``) are written empty.
    """
    missing = set(REQUIRED_COLUMNS) - set(records.columns)
    if missing:
        raise ValueError(f"records lack columns {sorted(missing)}")
    optional = {column: "" for column in RECORD_COLUMNS if column not in records.columns}
    records.assign(**optional).loc[:, list(RECORD_COLUMNS)].to_csv(root / "records.csv",
                                                                   index=False)


def write_meta(root: Path, meta: dict[str, Any]) -> None:
    meta = {"format": FORMAT_VERSION, **meta}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
