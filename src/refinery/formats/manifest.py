"""The image manifest: one row per raw record, with what decoding it revealed.

``validate`` decodes every record once, checks this table with Great
Expectations and saves it as ``data/manifest.parquet``, together with the
converted pixels (``data/pixels.npy``, see below): ``prepare`` packs those
instead of decoding again, after checking them against the manifest's
``content_hash``. When the pixels file is missing, or ``data/raw`` changed
since validation, ``prepare`` decodes the same rows with the same code
(:func:`map_chunks`) and compares the hashes instead.

Decoding is the slow part, so records go to a process pool in chunks, and
workers send back column arrays, not per-image objects, to keep pickling
cheap; the pixels themselves go straight into the shared ``pixels_out`` file
(a memory map), never through a pipe. Within a chunk, every plain JPEG of
exactly the configured size (all of CIFAR-10) is decoded by PIL's own JPEG
decoder straight into its slot of one tall image, and hashed and measured in
one pass (:func:`_decode_plain`): ~60 us per 32x32 image instead of ~170 us
through ``Image.open``, conversion and per-image numpy calls. Anything else
goes through :func:`convert` one image at a time.

Columns (nullable ones are null exactly when ``decodable`` is false)::

    id, split, class_id, class_name, location      from records.csv
    source_path                                    from records.csv ("" if none)
    nbytes                                         encoded size (arrays: pixel bytes)
    decodable, error                               error: "" when decodable
    width, height, mode                            of the source image (nullable)
    out_height, out_width, out_channels            after conversion (nullable)
    pixel_mean, pixel_std                          of the converted uint8 pixels (nullable)
    content_hash                                   blake2b-128 of shape + pixels (nullable)

The pixels file ``validate`` writes next to the manifest (only when the
manifest is written) is a plain ``.npy``: uint8 ``(N, size, size, channels)``,
row ``i`` the converted pixels of manifest row ``i``. The manifest's parquet
metadata (:data:`INFO_KEY`, read by :func:`read_manifest`) records what the
pair was built from: the ``images`` params, the pixel shape, and a fingerprint
of the raw files the rows point into (:func:`raw_fingerprint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import multiprocessing as mp
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refinery import progress
from refinery.formats.raw import (
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
#: A chunk's converted pixels stay under this (a worker holds a few copies of them).
_CHUNK_BYTES = 32 << 20
#: Parquet metadata key of the manifest: what it and its pixels file were built from.
INFO_KEY = b"refinery.validated"

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


def hash_rows(pixels: np.ndarray) -> list[str]:
    """:func:`content_hash` of each ``pixels[i]`` of a uint8 ``(n, ...)`` array, in one pass.

    The shape prefix is hashed once and the digest copied per row (blake2b is
    a stream, so the result is the same), and rows are hashed straight from
    the array's buffer, without a ``tobytes`` copy each.
    """
    if len(pixels) == 0:
        return []
    rows = np.ascontiguousarray(pixels, dtype=np.uint8)
    prefix = hashlib.blake2b(repr(tuple(rows.shape[1:])).encode(), digest_size=16)
    flat = memoryview(rows.reshape(-1))
    step = rows[0].size
    out = []
    for start in range(0, len(flat), step):
        digest = prefix.copy()
        digest.update(flat[start:start + step])
        out.append(digest.hexdigest())
    return out


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
        pixels = to_pixels(decoded.image, images.side, images.channels, images.resize)
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
    _worker.clear()
    _worker["raw"] = RawDataset(root=Path(root), meta=meta, records=records)
    _worker["images"] = ImageParams(**images)


def _plain_bytes(raw: RawDataset, location: str) -> bytes | None:
    """The encoded bytes of a packed or files record, or ``None``: leave it to :func:`convert`.

    A packed location is read straight from the blob (what
    :meth:`RawDataset.read_bytes` does, without building a :class:`Location`:
    a third of the per-image overhead once decoding itself is fast); anything
    unusual is left to ``convert``, which reports it with its own message.
    """
    path, sep, ref = location.partition("#")
    try:
        if not sep:
            return raw.read_bytes(location)
        offset, plus, length = ref.partition("+")
        if not (plus and offset.isdecimal() and length.isdecimal() and offset.isascii()
                and length.isascii() and path):
            return None  # an array row (no encoded bytes), or not a location at all
        blob = raw.blob(path)
        start = int(offset)
        end = start + int(length)
        return blob[start:end] if end <= len(blob) else None
    except (OSError, ValueError):
        return None


def _decode_plain(raw: RawDataset, locations: Sequence[str], images: ImageParams,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode the plain JPEGs of exactly the configured shape among ``locations``.

    Returns ``(pixels, done, nbytes)``: uint8 ``(n, size, size, channels)``
    (rows not ``done`` are unspecified), which rows were decoded, and their
    encoded sizes. Each JPEG is decoded by the decoder and arguments
    :func:`decode` uses (``Image.frombytes(mode, size, data, "jpeg", mode, "")``),
    but into its own ``size``-row band of one tall image, so a chunk costs one
    PIL image and one ``tobytes`` instead of an image, a conversion and an
    array per record. For these images :func:`convert` is the identity after
    decoding (same mode, same size), so the pixels are the ones it gives;
    ``tests/test_validate.py`` checks that. Anything else (another size or
    format, a decode error) is left for :func:`convert`.
    """
    from PIL import Image

    size, channels, n = images.side, images.channels, len(locations)
    done = np.zeros(n, dtype=bool)
    nbytes = np.zeros(n, dtype=np.int64)
    mode = {1: "L", 3: "RGB"}.get(channels)
    limit = Image.MAX_IMAGE_PIXELS
    if mode is None or n == 0 or (limit is not None and size * size > limit):
        return np.zeros((n, size, size, channels), dtype=np.uint8), done, nbytes
    want = (size, size, channels)
    tall = Image.new(mode, (size, size * n))
    for i, location in enumerate(locations):
        data = _plain_bytes(raw, location)
        if data is None or jpeg_header(data) != want:
            continue
        decoder = Image._getdecoder(mode, "jpeg", (mode, ""))  # what Image.frombytes calls
        try:
            decoder.setimage(tall.im, (0, i * size, size, (i + 1) * size))
            consumed, error = decoder.decode(data)
        except (OSError, ValueError):
            continue
        if consumed < 0 and error == 0:  # Image.frombytes' test for a complete image
            done[i], nbytes[i] = True, len(data)
    pixels = np.frombuffer(tall.tobytes(), dtype=np.uint8).reshape(n, *want)
    return pixels.copy() if not done.all() else pixels, done, nbytes


def _pixels_file(path: str) -> np.ndarray:
    """The ``pixels_out`` memory map of this process, opened once."""
    key = f"pixels:{path}"
    if key not in _worker:
        _worker[key] = np.load(path, mmap_mode="r+")
    return _worker[key]


def _convert_chunk(task: tuple[int, Sequence[str], bool, str | None]) -> Chunk:
    start, locations, keep_pixels, pixels_out = task
    raw: RawDataset = _worker["raw"]
    images: ImageParams = _worker["images"]
    n = len(locations)
    shape = (images.side, images.side, images.channels)
    pixels, fits, nbytes = _decode_plain(raw, locations, images)  # rows of the configured shape
    width = np.where(fits, images.side, -1).astype(np.int64)
    height = width.copy()
    out_shape = np.where(fits[:, None], np.asarray(shape, dtype=np.int64), -1)
    mean = np.full(n, np.nan)
    std = np.full(n, np.nan)
    plain_mode = "L" if images.channels == 1 else "RGB"
    modes: list[str | None] = [plain_mode if ok else None for ok in fits.tolist()]
    errors = [""] * n
    hashes: list[str | None] = [None] * n
    for i in np.flatnonzero(~fits).tolist():
        location = locations[i]
        pixels[i] = 0  # what a row that does not fit holds
        try:
            decoded, converted = convert(raw, location, images)
        except UndecodableImage as exc:
            errors[i] = clean_error(exc, location)
            nbytes[i] = raw.encoded_size(location)
            continue
        width[i], height[i], modes[i] = decoded.width, decoded.height, decoded.mode
        nbytes[i] = decoded.nbytes
        out_shape[i] = converted.shape
        if converted.shape == shape:
            pixels[i], fits[i] = converted, True
        else:  # recorded as is: the size expectations report it
            hashes[i] = content_hash(converted)
            mean[i], std[i] = (float(v[0]) for v in moments(converted.reshape(1, -1)))
    if fits.any():  # one vectorised pass instead of numpy calls per image
        fitting = pixels if fits.all() else pixels[fits]
        mean[fits], std[fits] = moments(fitting.reshape(len(fitting), -1))
        for i, digest in zip(np.flatnonzero(fits).tolist(), hash_rows(fitting), strict=True):
            hashes[i] = digest
    if pixels_out is not None:
        _pixels_file(pixels_out)[start:start + n] = pixels
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
    pixels_out: Path | None = None,
    desc: str = "decode",
    while_decoding: Callable[[], object] | None = None,
) -> Iterator[Chunk]:
    """Decode and convert ``locations`` in order, in chunks, on a process pool when it pays.

    ``keep_pixels`` sends the converted pixels back (``prepare`` when it
    decodes); ``pixels_out`` names an existing uint8 ``(len(locations), size,
    size, channels)`` ``.npy`` (:func:`create_pixels`) that the workers write
    each row's pixels into (``validate``: no pickling of ~3 KB per image, no
    copy in this process); rows that do not fit the shape hold zeros. Without
    either, only the per-image numbers come back.

    ``while_decoding`` is called once the workers exist, before any chunk is
    consumed: ``validate`` starts importing Great Expectations there (in a
    thread) so its ~5 s import overlaps the decoding. It runs after the fork
    on purpose: forking while another thread imports could hand a worker a
    held import lock.
    """
    workers = default_workers() if workers is None else max(1, workers)
    n = len(locations)
    pooled = workers > 1 and n >= POOL_MIN_RECORDS
    size = min(_MAX_CHUNK, max(64, -(-n // (workers * 8)))) if pooled else 512
    size = max(1, min(size, _CHUNK_BYTES // (images.side ** 2 * images.channels)))
    out = None if pixels_out is None else str(pixels_out)
    tasks = [(start, list(locations[start:start + size]), keep_pixels, out)
             for start in range(0, n, size)]
    init_args = (str(raw.root), raw.meta, images.model_dump())
    if not pooled:
        _init_worker(*init_args)
        if while_decoding is not None:
            while_decoding()
        try:
            with progress.bar(total=n, desc=desc, unit="img") as shown:
                for task in tasks:
                    chunk = _convert_chunk(task)
                    shown.update(len(chunk))
                    yield chunk
        finally:
            _worker.pop(f"pixels:{out}", None)  # close this process's map of the file
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
    pixels_out: Path | None = None,
) -> pd.DataFrame:
    """Decode every record of ``raw`` once and return the manifest (see the module doc).

    With ``pixels_out``, also write every record's converted pixels there
    (created or replaced; see :func:`map_chunks`), row ``i`` for record ``i``.
    """
    records = raw.records.reset_index(drop=True)
    if pixels_out is not None:
        create_pixels(pixels_out, len(records), images)
    chunks = list(map_chunks(raw, images, records["location"].tolist(), workers,
                             pixels_out=pixels_out, desc="manifest",
                             while_decoding=while_decoding))

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


# ------------------------------------------------------ the handoff to prepare


#: Where ``validate`` writes the pixels and ``prepare`` reads them: next to the manifest.
PIXELS_NAME = "pixels.npy"


def pixels_path_for(manifest_path: str | os.PathLike[str]) -> Path:
    """The pixels file that goes with a manifest (``data/pixels.npy`` for the pipeline's)."""
    return Path(manifest_path).with_name(PIXELS_NAME)


def pixels_shape(rows: int, images: ImageParams) -> tuple[int, int, int, int]:
    return rows, images.side, images.side, images.channels


def create_pixels(path: Path, rows: int, images: ImageParams) -> None:
    """A zero-filled uint8 ``.npy`` of ``rows`` converted images (sparse until written)."""
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                       shape=pixels_shape(rows, images))
    del pixels  # flushed and closed: workers open it themselves


def copy_rows(source: Path, target: Path, keep: np.ndarray, block: int = 8192) -> None:
    """Write the rows ``keep`` (a boolean mask) of the ``.npy`` ``source`` to ``target``."""
    src = np.load(source, mmap_mode="r")
    rows = np.flatnonzero(keep)
    out = np.lib.format.open_memmap(target, mode="w+", dtype=src.dtype,
                                    shape=(len(rows), *src.shape[1:]))
    for start in range(0, len(rows), block):
        out[start:start + block] = src[rows[start:start + block]]
    out.flush()
    del out, src


def raw_fingerprint(raw: RawDataset, locations: Iterable[str]) -> str:
    """sha256 of the names and bytes of every raw file that ``locations`` point into.

    What the pixels of those records are made from (the packed blob, the
    arrays, or each image file), so ``prepare`` can tell cheaply that
    ``data/raw`` is still what ``validate`` decoded (~0.1 s for CIFAR-10's
    55 MB blob). A missing file hashes as missing.
    """
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    for name in sorted({location.partition("#")[0] for location in locations}):
        digest.update(name.encode() + b"\0")
        try:
            with open(raw.root / name, "rb") as fh:
                digest.update(os.fstat(fh.fileno()).st_size.to_bytes(8, "little"))
                while count := fh.readinto(buffer):
                    digest.update(view[:count])
        except FileNotFoundError:
            digest.update(b"missing\0")
    return digest.hexdigest()


def build_info(raw: RawDataset, manifest: pd.DataFrame, images: ImageParams) -> dict[str, Any]:
    """What :func:`write_manifest` records: the params, pixel shape and raw files used."""
    return {"images": images.model_dump(mode="json"),
            "pixels_shape": list(pixels_shape(len(manifest), images)),
            "raw_sha256": raw_fingerprint(raw, manifest["location"].tolist())}


def write_manifest(manifest: pd.DataFrame, path: Path, info: dict[str, Any] | None = None,
                   ) -> None:
    """Write the manifest parquet to ``path`` (atomic: the caller's), ``info`` in its metadata.

    Same frame and info, same bytes (DVC then skips ``prepare`` when only
    ``validate``'s own params changed).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(manifest, preserve_index=False)
    if info is not None:
        metadata = dict(table.schema.metadata or {})
        metadata[INFO_KEY] = json.dumps(info, sort_keys=True).encode()
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)


def read_manifest(path: Path) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """The manifest and the info :func:`write_manifest` stored (``None`` if it has none)."""
    import pyarrow.parquet as pq

    stored = (pq.read_schema(path).metadata or {}).get(INFO_KEY)
    return pd.read_parquet(path), None if stored is None else json.loads(stored)
