"""The packed data every training stage reads: written by ``prepare``.

::

    data/prepared/
      train.pt, val.pt, test.pt   {"images": uint8 (N, C, H, W), "labels": int64 (N,),
                                   "ids": list[str]}
      labeled.pt                  {"indices": int64 (K,)} rows of train.pt whose labels
                                  fine-tuning may use; the other rows are the unlabeled pool
      meta.json                   classes, channels, size, per-channel mean/std (0..1 scale,
                                  computed on train only), counts, seed, fractions

uint8 NCHW tensors are 4x smaller than float and go to the GPU in one copy;
all files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SPLIT_FILES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    ids: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class PreparedData:
    root: Path
    meta: dict[str, Any]
    train: Split
    val: Split
    test: Split
    labeled: torch.Tensor  # int64 indices into train

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def mean(self) -> list[float]:
        return list(self.meta["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.meta["std"])

    @property
    def unlabeled(self) -> torch.Tensor:
        """Rows of train outside the labeled subset (the pool distillation uses)."""
        mask = torch.ones(len(self.train), dtype=torch.bool)
        mask[self.labeled] = False
        return torch.nonzero(mask).flatten()


def content_digest(split: Split, classes: list[str]) -> str:
    """sha256 of a split's pixels, labels and class names: the same images labelled the
    same way give the same digest, whatever file they were read from."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(repr((tuple(split.images.shape), classes)).encode())
    digest.update(split.images.contiguous().numpy().tobytes())
    digest.update(split.labels.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def describe(split: Split, classes: list[str], name: str, source: str) -> dict[str, Any]:
    """One split as a data set: name, content digest (16 hex), source, and the profile a
    person checks first (images, per-class counts, side, channels). Written to
    ``meta.json`` by ``prepare``; every run that reads the split logs it as is, so the
    digests agree across stages by construction."""
    counts = torch.bincount(split.labels, minlength=len(classes)).tolist()
    return {
        "name": name,
        "digest": content_digest(split, classes)[:16],
        "source": source,
        "profile": {"images": len(split), "channels": int(split.images.shape[1]),
                    "side": int(split.images.shape[-1]),
                    "class_counts": dict(zip(classes, counts, strict=True))},
    }


def datasets(root: str | Path) -> dict[str, dict[str, Any]]:
    """The split descriptions ``prepare`` wrote (empty for data prepared before them)."""
    meta = json.loads((Path(root) / "meta.json").read_text())
    return dict(meta.get("datasets") or {})


def dataset_identity(root: str | Path) -> str:
    """``<source>:<test digest>``: which data set a test-set score was measured on.

    Two scores are comparable only on the same test split; the registry gate
    uses this to never compare a champion measured on other data.
    """
    root = Path(root)
    meta = json.loads((root / "meta.json").read_text())
    test = load_split(root / "test.pt")
    return f"{meta.get('source') or 'unknown'}:{content_digest(test, list(meta['classes']))[:16]}"


def save_split(path: Path, split: Split) -> None:
    torch.save({"images": split.images.contiguous(), "labels": split.labels, "ids": split.ids},
               path)


def load_split(path: Path) -> Split:
    blob = torch.load(path, weights_only=True)
    return Split(images=blob["images"], labels=blob["labels"], ids=list(blob["ids"]))


def load_prepared(root: str | Path, splits: tuple[str, ...] = SPLIT_FILES) -> PreparedData:
    """Load the prepared data (only the named splits; others are empty placeholders)."""
    root = Path(root)
    meta = json.loads((root / "meta.json").read_text())
    empty = Split(
        images=torch.empty((0, meta["channels"], meta["size"], meta["size"]), dtype=torch.uint8),
        labels=torch.empty((0,), dtype=torch.int64),
        ids=[],
    )
    loaded = {name: load_split(root / f"{name}.pt") if name in splits else empty
              for name in SPLIT_FILES}
    labeled = torch.load(root / "labeled.pt", weights_only=True)["indices"]
    return PreparedData(root=root, meta=meta, labeled=labeled, **loaded)
