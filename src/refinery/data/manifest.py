"""The image manifest: one row per raw record, with what decoding it revealed.

``validate`` checks this table with Great Expectations and saves it as
``data/manifest.parquet``; ``prepare`` decodes the same rows again with the
same code (:func:`convert`, :func:`map_chunks`), so the pixels it packs are the
pixels that were validated (it re-checks ``content_hash`` to make sure).

Decoding is the slow part (for a 32x32 JPEG, ``Image.open`` + ``load`` cost
~170 us of CPU, most of it PIL parsing the header in Python; :func:`decode`
halves that), so records go to a process pool in chunks, and workers send
back column arrays, not per-image objects, to keep pickling cheap.

Columns (nullable ones are null exactly when ``decodable`` is false)::

    id, split, class_id, class_name, location      from records.csv
    source_path                                    from records.csv ("" if none)
    nbytes                                         encoded size (arrays: pixel bytes)
    decodable, error                               error: "" when decodable
    width, height, mode                            of the source image (nullable)
    out_height, out_width, out_channels            after conversion (nullable)
    pixel_mean, pixel_std                          of the converted uint8 pixels (nullable)
    content_hash                                   blake2b-128 of shape + pixels (nullable)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import multiprocessing as mp
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refinery import progress
from refinery.data.raw import (
    RECORD_COLUMNS,
    DecodedImage,
    RawDataset,
    UndecodableImage,
    parse_location,
    to_pixels,
)
from refinery.params import ImageParams

MANIFEST_COLUMNS = (
    "id", "split", "class_id", "class_name", "location", "source_path", "width", "height",
    "mode", "nbytes", "decodable", "error", "out_height", "out_width", "out_channels",
    "pixel_mean", "pixel_std", "content_hash",
)
#: Columns that are never null; the pixel columns are null exactly for undecodable rows.
REQUIRED_COLUMNS = ("id", "split", "class_id", "class_name", "location", "source_path",
                    "nbytes", "decodable", "error")
#: Below this many records a pool costs more (process start, pickling) than it saves.
POOL_MIN_RECORDS = 2048
_MAX_CHUNK = 2048

_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Chunk:
    """What a worker returns for consecutive records: column arrays, plus pixels on request."""

    start: int
    width: np.ndarray  # int64 (n,), -1 where undecodable
    height: np.ndarray
    mode: list[str | None]
    nbytes: np.ndarray  # int64 (n,)
    error: list[str]  # "" where decodable
    out_shape: np.ndarray  # int64 (n, 3): height, width, channels after conversion; -1 if none
    mean: np.ndarray  # float64 (n,), NaN where undecodable
    std: np.ndarray
    hashes: list[str | None]
    pixels: np.ndarray | None  # uint8 (n, size, size, channels) when asked for; zeros if bad

    def __len__(self) -> int:
        return len(self.error)

    @property
    def decodable(self) -> np.ndarray:
        return np.asarray([not e for e in self.error], dtype=bool)


def content_hash(pixels: np.ndarray) -> str:
    """blake2b-128 of the shape and the uint8 pixels: equal for the same picture in any file."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(tuple(pixels.shape)).encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def moments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each row of uint8 values, from exact integer sums.

    Integer sums are exact (so a constant image has std exactly 0) and avoid a
    float64 copy 8x the size of the pixels, which made ``np.std`` the slowest
    step after decoding.
    """
    count = rows.shape[1]
    wide = rows.astype(np.uint16)  # 255**2 fits in uint16
    total = rows.sum(axis=1, dtype=np.int64)
    squares = (wide * wide).sum(axis=1, dtype=np.int64)
    variance = (count * squares - total * total) / float(count * count)
    return total / count, np.sqrt(np.maximum(variance, 0.0))


def clean_error(exc: BaseException, location: str) -> str:
    """A decode error as a short, stable message (no location prefix, no memory addresses)."""
    message = str(exc)
    if message.startswith(f"{location}: "):
        message = message[len(location) + 2:]
    message = _ADDRESS.sub("", message).strip()
    if not isinstance(exc, UndecodableImage | OSError | ValueError):
        message = f"{type(exc).__name__}: {message}"
    return message or type(exc).__name__


#: Frame headers PIL and the fast path decode alike: baseline, extended, progressive Huffman.
_PLAIN_SOF = frozenset({0xC0, 0xC1, 0xC2})
#: Other frame types (lossless, arithmetic, hierarchical): left to PIL. C4/C8/CC are not frames.
_OTHER_SOF = frozenset(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` of a plain 8-bit Huffman JPEG, else ``None``.

    Walks the marker segments up to the frame header (a few segments, ~1 us):
    the part of PIL's JPEG plugin that costs ~60 us per image in Python.
    ``None`` (anything unusual) sends the image down PIL's own path.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    pos, end = 2, len(data)
    while pos + 9 < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _PLAIN_SOF:
            bits, components = data[pos + 4], data[pos + 9]
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            if bits != 8 or components not in (1, 3) or not width or not height:
                return None
            return width, height, components
        if marker in _OTHER_SOF or marker in (0x01, 0xD8, 0xD9, 0xDA) or 0xD0 <= marker <= 0xD7:
            return None  # another frame type, or a marker that has no place before the frame
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return None


def decode(raw: RawDataset, location: str) -> DecodedImage:
    """:meth:`RawDataset.decode`, with a fast path for plain JPEGs (the same pixels).

    For an 8-bit baseline/progressive JPEG with 1 or 3 components (told by its
    bytes, not its name: packed records have no file name), PIL's own JPEG
    decoder is called directly (``Image.frombytes(..., "jpeg", mode, "")``: the
    decoder and arguments ``Image.open`` would use) and PIL's Python header
    parsing is skipped, about 2x faster per small image. Anything else (PNG,
    CMYK, 12-bit, arithmetic coding, images over PIL's decompression-bomb limit,
    any decode error) goes through ``raw.decode`` unchanged, so errors keep
    PIL's messages. ``tests/test_validate.py`` checks both paths give the same
    pixels.
    """
    from PIL import Image

    if parse_location(location).kind == "arrays":
        return raw.decode(location)
    try:
        data = raw.read_bytes(location)
    except (OSError, ValueError):
        return raw.decode(location)  # raises the error it would have raised anyway
    header = jpeg_header(data)
    limit = Image.MAX_IMAGE_PIXELS
    if header is None or (limit is not None and header[0] * header[1] > limit):
        return raw.decode(location)
    width, height, components = header
    mode = "L" if components == 1 else "RGB"
    try:
        image = Image.frombytes(mode, (width, height), data, "jpeg", mode, "")
    except (OSError, ValueError):
        return raw.decode(location)  # truncated or corrupt: PIL's own error message
    return DecodedImage(image, width, height, mode, len(data))


def convert(raw: RawDataset, location: str, images: ImageParams) -> tuple[DecodedImage, np.ndarray]:
    """Decode one record and convert it to the configured shape: ``(decoded, pixels)``.

    Raises :class:`UndecodableImage` for the errors a bad file causes (PIL's
    errors, a missing file, a decompression bomb, a failed mode conversion),
    so one bad file is a row in the report, not a crash of the stage. Other
    exceptions are bugs and propagate.
    """
    from PIL import Image

    try:
        decoded = decode(raw, location)
        pixels = to_pixels(decoded.image, images.size, images.channels, images.resize)
    except UndecodableImage:
        raise
    except FileNotFoundError:
        raise UndecodableImage("file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UndecodableImage(clean_error(exc, location)) from None
    return decoded, pixels


# ------------------------------------------------------------------------- workers

_worker: dict[str, Any] = {}


def _init_worker(root: str, meta: dict[str, Any], images: dict[str, Any]) -> None:
    records = pd.DataFrame(columns=list(RECORD_COLUMNS))  # workers need root and meta only
    _worker["raw"] = RawDataset(root=Path(root), meta=meta, records=records)
    _worker["images"] = ImageParams(**images)


def _convert_chunk(task: tuple[int, Sequence[str], bool]) -> Chunk:
    start, locations, keep_pixels = task
    raw: RawDataset = _worker["raw"]
    images: ImageParams = _worker["images"]
    n = len(locations)
    shape = (images.size, images.size, images.channels)
    pixels = np.zeros((n, *shape), dtype=np.uint8)  # rows of the configured shape
    fits = np.zeros(n, dtype=bool)
    width = np.full(n, -1, dtype=np.int64)
    height = np.full(n, -1, dtype=np.int64)
    nbytes = np.zeros(n, dtype=np.int64)
    out_shape = np.full((n, 3), -1, dtype=np.int64)
    mean = np.full(n, np.nan)
    std = np.full(n, np.nan)
    modes: list[str | None] = [None] * n
    errors = [""] * n
    hashes: list[str | None] = [None] * n
    for i, location in enumerate(locations):
        try:
            decoded, converted = convert(raw, location, images)
        except UndecodableImage as exc:
            errors[i] = clean_error(exc, location)
            nbytes[i] = raw.encoded_size(location)
            continue
        width[i], height[i], modes[i] = decoded.width, decoded.height, decoded.mode
        nbytes[i] = decoded.nbytes
        out_shape[i] = converted.shape
        hashes[i] = content_hash(converted)
        if converted.shape == shape:
            pixels[i], fits[i] = converted, True
        else:  # recorded as is: the size expectations report it
            mean[i], std[i] = (float(v[0]) for v in moments(converted.reshape(1, -1)))
    if fits.any():  # one vectorised pass instead of numpy calls per image
        mean[fits], std[fits] = moments(pixels[fits].reshape(int(fits.sum()), -1))
    return Chunk(start, width, height, modes, nbytes, errors, out_shape, mean, std, hashes,
                 pixels if keep_pixels else None)


class BackgroundImport:
    """Import a module in a thread so that its import overlaps the decoding.

    Pass ``start`` as ``while_decoding`` to :func:`map_chunks`; ``join`` before
    using the module. An import error is left to the caller's own import.
    """

    def __init__(self, module: str) -> None:
        self.module = module
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"import-{self.module}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(self.module)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_chunks(
    raw: RawDataset,
    images: ImageParams,
    locations: Sequence[str],
    workers: int | None = None,
    *,
    keep_pixels: bool = False,
    desc: str = "decode",
    while_decoding: Callable[[], object] | None = None,
) -> Iterator[Chunk]:
    """Decode and convert ``locations`` in order, in chunks, on a process pool when it pays.

    ``keep_pixels`` sends the converted pixels back (``prepare``); ``validate``
    needs only the per-image numbers, which saves pickling ~3 KB per image.
    ``while_decoding`` is called once the workers exist, before any chunk is
    consumed: ``validate`` starts importing Great Expectations there (in a
    thread) so its ~5 s import overlaps the decoding. It runs after the fork on
    purpose: forking while another thread imports could hand a worker a held
    import lock.
    """
    workers = default_workers() if workers is None else max(1, workers)
    n = len(locations)
    pooled = workers > 1 and n >= POOL_MIN_RECORDS
    size = min(_MAX_CHUNK, max(64, -(-n // (workers * 8)))) if pooled else 512
    tasks = [(start, list(locations[start:start + size]), keep_pixels)
             for start in range(0, n, size)]
    init_args = (str(raw.root), raw.meta, images.model_dump())
    if not pooled:
        _init_worker(*init_args)
        if while_decoding is not None:
            while_decoding()
        with progress.bar(total=n, desc=desc, unit="img") as shown:
            for task in tasks:
                chunk = _convert_chunk(task)
                shown.update(len(chunk))
                yield chunk
        return
    methods = mp.get_all_start_methods()
    context = mp.get_context("fork" if "fork" in methods else None)
    with context.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        if while_decoding is not None:
            while_decoding()
        with progress.bar(total=n, desc=desc, unit="img") as shown:
            for chunk in pool.imap(_convert_chunk, tasks):
                shown.update(len(chunk))
                yield chunk


def build_manifest(
    raw: RawDataset,
    images: ImageParams,
    workers: int | None = None,
    *,
    while_decoding: Callable[[], object] | None = None,
) -> pd.DataFrame:
    """Decode every record of ``raw`` once and return the manifest (see the module doc)."""
    records = raw.records.reset_index(drop=True)
    chunks = list(map_chunks(raw, images, records["location"].tolist(), workers,
                             desc="manifest", while_decoding=while_decoding))

    def column(name: str) -> np.ndarray:
        parts = [getattr(chunk, name) for chunk in chunks]
        return np.concatenate(parts) if parts else np.zeros(0)

    def listed(name: str) -> list[Any]:
        return [value for chunk in chunks for value in getattr(chunk, name)]

    errors = listed("error")
    decodable = np.asarray([not e for e in errors], dtype=bool)
    out_shape = np.concatenate([c.out_shape for c in chunks]) if chunks else np.zeros((0, 3))

    def nullable_int(values: np.ndarray) -> pd.Series:
        return pd.Series(values, dtype="Int64").mask(~decodable)

    manifest = pd.DataFrame({
        "id": records["id"].astype(str),
        "split": records["split"].astype(str),
        "class_id": records["class_id"].astype(np.int64),
        "class_name": records["class_name"].astype(str),
        "location": records["location"].astype(str),
        "source_path": records["source_path"].astype(str) if "source_path" in records
        else pd.Series([""] * len(records), dtype="str"),
        "width": nullable_int(column("width")),
        "height": nullable_int(column("height")),
        "mode": pd.Series(listed("mode"), dtype="str"),
        "nbytes": column("nbytes").astype(np.int64),
        "decodable": decodable,
        "error": pd.Series(errors, dtype="str"),
        "out_height": nullable_int(out_shape[:, 0]),
        "out_width": nullable_int(out_shape[:, 1]),
        "out_channels": nullable_int(out_shape[:, 2]),
        "pixel_mean": column("mean").astype(np.float64),
        "pixel_std": column("std").astype(np.float64),
        "content_hash": pd.Series(listed("hashes"), dtype="str"),
    })
    return manifest.loc[:, list(MANIFEST_COLUMNS)]
