"""The ``prepare`` stage: pack the validated images into the tensors training reads.

Only the rows of ``data/manifest.parquet`` are used: it exists only when
``validate`` passed, and it lists exactly the images that were checked (after
any ``drop_undecodable``). Images are decoded and converted with the same code
as the manifest (:func:`refinery.data.manifest.map_chunks`), and each one's
``content_hash`` is compared with the manifest's, so a ``data/raw`` or
``images`` change since validation is an error here, not silently new data.

Splits are seeded and stratified per class; the normalisation statistics come
from the train split only (val and test must not leak into preprocessing).
Same inputs and seed give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refinery import fsutil
from refinery.data import manifest as manifest_mod
from refinery.data.raw import RawDataset
from refinery.errors import DataValidationFailed
from refinery.params import ImageParams, PrepareParams

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5


@dataclass
class PrepareResult:
    """What ``prepare`` wrote; ``metrics()`` goes to ``metrics/prepare.json`` and MLflow."""

    counts: dict[str, int]  # train, val, test
    labeled: int
    classes: list[str]
    mean: list[float]
    std: list[float]
    timings: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {f"{split}_images": float(n) for split, n in self.counts.items()}
        out.update({"labeled_images": float(self.labeled),
                    "unlabeled_images": float(self.counts["train"] - self.labeled),
                    "classes": float(len(self.classes))})
        out.update({key: round(value, 3) for key, value in self.timings.items()})
        return out


def _round_half_up(x: float) -> int:
    """Conventional rounding (Python's round() sends 2.5 to 2)."""
    return int(np.floor(x + 0.5))


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of ``round(n_c * fraction)`` items of each class ``c``, chosen by ``rng``.

    Per-class rounding keeps each class's share the same on both sides (what
    sklearn's ``train_test_split(stratify=...)`` approximates globally) and,
    unlike it, works for any class size: a class of two or more keeps at least
    one item on each side; a singleton stays out of the holdout.
    """
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = _round_half_up(len(members) * fraction)
        n = min(max(n, 1), len(members) - 1) if len(members) >= 2 else 0
        held[rng.permutation(members)[:n]] = True
    return held


def labeled_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``max(1, round(n_c * fraction))`` items of each class."""
    picked: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = min(len(members), max(1, _round_half_up(len(members) * fraction)))
        picked.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def channel_stats(pixels: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std on the 0..1 scale of uint8 ``(N, H, W, C)`` pixels.

    From a 256-bin histogram per channel: exact, and no float copy of the data.
    """
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for channel in range(pixels.shape[-1]):
        hist = np.bincount(pixels[..., channel].ravel(), minlength=256).astype(np.float64)
        count = hist.sum()
        mean = float((hist * values).sum() / count)
        variance = float((hist * (values - mean) ** 2).sum() / count)
        means.append(mean / 255.0)
        stds.append(variance ** 0.5 / 255.0)
    return means, stds


def _check_manifest(manifest: pd.DataFrame, images: ImageParams, classes: list[str]) -> None:
    """The manifest must be the one ``validate`` wrote for these ``images`` params."""
    if not manifest["decodable"].all():
        raise DataValidationFailed("the manifest lists undecodable images: run validate again")
    shape = (images.size, images.size, images.channels)
    built = manifest[["out_height", "out_width", "out_channels"]].drop_duplicates()
    if len(manifest) == 0 or len(built) != 1 or tuple(int(v) for v in built.iloc[0]) != shape:
        found = sorted({tuple(int(v) for v in row) for row in built.dropna().to_numpy()})
        raise DataValidationFailed(
            f"the manifest was built for images of shape {found}, params.images asks for "
            f"{shape}: run the validate stage again (dvc repro does)")
    if manifest["class_id"].min() < 0 or manifest["class_id"].max() >= len(classes):
        raise DataValidationFailed("the manifest's class ids do not match the dataset's classes")


def _decode(raw: RawDataset, manifest: pd.DataFrame, images: ImageParams,
            workers: int | None, while_decoding: Any = None) -> np.ndarray:
    """All images of the manifest as uint8 ``(N, H, W, C)``, checked against its hashes."""
    n = len(manifest)
    pixels = np.empty((n, images.size, images.size, images.channels), dtype=np.uint8)
    expected = manifest["content_hash"].to_numpy()
    locations = manifest["location"].tolist()
    problems: list[str] = []
    for chunk in manifest_mod.map_chunks(raw, images, locations, workers, keep_pixels=True,
                                         desc="prepare", while_decoding=while_decoding):
        rows = slice(chunk.start, chunk.start + len(chunk))
        assert chunk.pixels is not None
        pixels[rows] = chunk.pixels
        for offset, (error, digest) in enumerate(zip(chunk.error, chunk.hashes, strict=True)):
            row = chunk.start + offset
            if error:
                problems.append(f"{locations[row]} ({error})")
            elif digest != expected[row]:
                problems.append(f"{locations[row]} (pixels differ from the validated ones)")
    if problems:
        raise DataValidationFailed(
            f"{len(problems)} images changed since validation, e.g. "
            f"{', '.join(problems[:MAX_EXAMPLES])}: run the validate stage again")
    return pixels


def _pack(pixels: np.ndarray, labels: np.ndarray, ids: list[str]) -> Any:
    import torch

    from refinery.data.prepared import Split

    images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    return Split(images=images, labels=torch.from_numpy(labels.astype(np.int64)), ids=ids)


def prepare(p: PrepareParams, images: ImageParams, seed: int, raw_dir: Path,
            manifest_path: Path, out_dir: Path, workers: int | None = None) -> PrepareResult:
    """Write ``out_dir`` (train/val/test/labeled ``.pt`` + ``meta.json``) from the manifest."""
    started = time.perf_counter()
    raw = RawDataset.load(raw_dir)
    classes = raw.classes
    manifest = pd.read_parquet(manifest_path)
    _check_manifest(manifest, images, classes)
    torch_import = manifest_mod.BackgroundImport("torch")  # ~2 s, overlapped with decoding
    pixels = _decode(raw, manifest, images, workers, while_decoding=torch_import.start)
    decoded = time.perf_counter()
    torch_import.join()
    import torch

    from refinery.data.prepared import save_split

    labels = manifest["class_id"].to_numpy(dtype=np.int64)
    ids = manifest["id"].astype(str).to_numpy()
    split = manifest["split"].to_numpy()
    val_rng, label_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train_rows = np.flatnonzero(split == "train")
    test_rows = np.flatnonzero(split == "test")
    held = stratified_holdout(labels[train_rows], p.val_fraction, val_rng)
    rows = {"train": train_rows[~held], "val": train_rows[held], "test": test_rows}
    if any(len(r) == 0 for r in rows.values()):
        sizes = {name: len(r) for name, r in rows.items()}
        raise DataValidationFailed(f"prepare needs images in every split, got {sizes}")
    labeled = labeled_subset(labels[rows["train"]], p.label_fraction, label_rng)
    mean, std = channel_stats(pixels[rows["train"]])

    counts = {name: len(r) for name, r in rows.items()}
    meta = {
        "classes": classes,
        "channels": images.channels,
        "size": images.size,
        "resize": images.resize,
        "mean": mean,
        "std": std,
        "counts": counts,
        "class_counts": {name: {classes[c]: int(n) for c, n in
                                enumerate(np.bincount(labels[r], minlength=len(classes)))}
                         for name, r in rows.items()},
        "labeled": len(labeled),
        "seed": seed,
        "val_fraction": p.val_fraction,
        "label_fraction": p.label_fraction,
        "source": raw.meta.get("source"),
        "source_sha256": raw.meta.get("sha256"),
    }
    with fsutil.atomic_dir(out_dir) as tmp:
        for name, r in rows.items():
            save_split(tmp / f"{name}.pt", _pack(pixels[r], labels[r], ids[r].tolist()))
        torch.save({"indices": torch.from_numpy(labeled.astype(np.int64))}, tmp / "labeled.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    finished = time.perf_counter()
    result = PrepareResult(counts, len(labeled), classes, mean, std, timings={
        "decode_seconds": decoded - started, "seconds": finished - started})
    log.info("prepare: %d train (%d labeled) + %d val + %d test images, %d classes, "
             "mean %s std %s, in %.1fs", counts["train"], len(labeled), counts["val"],
             counts["test"], len(classes), [round(m, 4) for m in mean],
             [round(s, 4) for s in std], result.timings["seconds"])
    return result
