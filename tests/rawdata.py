"""Small raw datasets for tests, written straight into the ``data/raw`` layout.

The kinds ``download`` produces: ``packed`` (real image files written by PIL,
one after another in ``images.bin``, as an image-folder download leaves them),
``files`` (the same files one per path) and ``arrays`` (``.npy`` pixels).
Images are seeded noise over a per-class gradient: every image is distinct,
not blank, with a mean well inside the default bounds.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from refinery.formats import raw

CLASSES = ("cat", "dog", "frog")


@dataclass
class Extra:
    """A hand-made file added to a files dataset (a broken JPEG, a copy, ...)."""

    split: str
    class_name: str
    name: str
    data: bytes


@dataclass
class Spec:
    classes: tuple[str, ...] = CLASSES
    per_class: dict[str, int] = field(default_factory=lambda: {"train": 12, "test": 4})
    size: int = 10
    channels: int = 3
    fmt: str = "PNG"
    seed: int = 0


def picture(rng: np.random.Generator, size: int, channels: int, class_id: int) -> np.ndarray:
    """A distinct, textured uint8 ``(size, size, channels)`` image."""
    ramp = np.linspace(40, 200, size)[None, :, None] + 15 * class_id
    noise = rng.integers(-30, 31, size=(size, size, channels))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG", **options: object) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _meta(kind: str, classes: Iterable[str], records: pd.DataFrame) -> dict[str, object]:
    counts = records["split"].value_counts()
    return {
        "source": "test", "kind": kind, "classes": list(classes), "sha256": "0" * 64,
        "counts": {split: int(counts.get(split, 0)) for split in raw.SPLITS},
    }


def files_dataset(root: Path, spec: Spec | None = None, extras: Iterable[Extra] = (),
                  kind: str = "files") -> pd.DataFrame:
    """Write a ``files`` (or ``packed``) raw dataset under ``root``; return its records.

    ``packed`` records have ``source_path`` ``mydata/<split>/<class>/<name>``;
    ``files`` records have none, like a raw folder written by another tool.
    """
    spec = spec or Spec()
    rng = np.random.default_rng(spec.seed)
    suffix = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp"}[spec.fmt]
    rows = []
    blob = bytearray()

    def add(split: str, class_name: str, name: str, data: bytes) -> None:
        relative = f"{split}/{class_name}/{name}"
        if kind == "packed":
            location, source_path = raw.packed_location(len(blob), len(data)), f"mydata/{relative}"
            blob.extend(data)
        else:
            location, source_path = f"files/{relative}", ""
            path = root / location
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        class_id = (spec.classes.index(class_name) if class_name in spec.classes
                    else len(spec.classes))
        rows.append({"id": relative, "split": split, "class_id": class_id,
                     "class_name": class_name, "location": location,
                     "source_path": source_path})

    for split, count in spec.per_class.items():
        for class_id, class_name in enumerate(spec.classes):
            for i in range(count):
                pixels = picture(rng, spec.size, spec.channels, class_id)
                add(split, class_name, f"{i:04d}.{suffix}", encode(pixels, spec.fmt))
    for extra in extras:
        add(extra.split, extra.class_name, extra.name, extra.data)
    records = pd.DataFrame(rows, columns=list(raw.RECORD_COLUMNS))
    root.mkdir(parents=True, exist_ok=True)
    if kind == "packed":
        (root / raw.PACKED_BLOB).write_bytes(bytes(blob))
    raw.write_records(root, records)
    raw.write_meta(root, _meta(kind, spec.classes, records))
    return records


def arrays_dataset(root: Path, spec: Spec | None = None) -> pd.DataFrame:
    """Write an ``arrays`` raw dataset (``arrays/<split>.npy``) under ``root``."""
    spec = spec or Spec(channels=1, size=8)
    rng = np.random.default_rng(spec.seed)
    (root / "arrays").mkdir(parents=True, exist_ok=True)
    frames = []
    for split, count in spec.per_class.items():
        labels = np.repeat(np.arange(len(spec.classes)), count)
        pixels = np.stack([picture(rng, spec.size, spec.channels, int(c)) for c in labels])
        np.save(root / "arrays" / f"{split}.npy", pixels)
        frames.append(pd.DataFrame({
            "id": [f"{split}:{i:05d}" for i in range(len(labels))],
            "split": split,
            "class_id": labels,
            "class_name": [spec.classes[c] for c in labels],
            "location": [f"arrays/{split}.npy#{i}" for i in range(len(labels))],
        }))
    records = pd.concat(frames, ignore_index=True)
    raw.write_records(root, records)
    raw.write_meta(root, _meta("arrays", spec.classes, records))
    return records


def rewrite_records(root: Path, records: pd.DataFrame) -> None:
    """Replace ``records.csv`` (to plant label errors)."""
    raw.write_records(root, records)
