"""The ``prepare`` stage: pack the validated images into the tensors training reads.

Only the rows of ``data/manifest.parquet`` are used: it exists only when
``validate`` passed, and it lists exactly the images that were checked (after
any ``drop_undecodable``). The pixels are the ones ``validate`` converted and
wrote next to it (``data/pixels.npy``, memory-mapped, not decoded again), each
row re-hashed against the manifest's ``content_hash``. The manifest records
the ``images`` params and a fingerprint of the raw files it was built from:
other params are refused, and if ``data/raw`` changed since validation (or
there is no pixels file) the images are decoded again with the manifest's own
code (:func:`refinery.formats.manifest.map_chunks`) and their hashes compared, so
a ``data/raw`` or ``images`` change since validation is an error here, naming
the images that changed, not silently new data.

Splits are seeded and stratified per class; the normalisation statistics come
from the train split only (val and test must not leak into preprocessing).
Same inputs and seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refinery import fsutil, paths, stage
from refinery.errors import DataValidationFailed
from refinery.formats import manifest as manifest_mod
from refinery.formats.raw import RawDataset
from refinery.params import ImageParams, Params, PrepareParams
from refinery.pipeline import stage_named
from refinery.splits import labeled_subset, stratified_holdout

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
    decoded: bool = False  # pixels decoded from data/raw again, not validate's pixels file

    def metrics(self) -> dict[str, float]:
        out = {f"{split}_images": float(n) for split, n in self.counts.items()}
        out.update({"labeled_images": float(self.labeled),
                    "unlabeled_images": float(self.counts["train"] - self.labeled),
                    "classes": float(len(self.classes)),
                    "decoded_images": float(sum(self.counts.values()) if self.decoded else 0)})
        out.update({key: round(value, 3) for key, value in self.timings.items()})
        return out


def channel_histograms(pixels: np.ndarray, channel_axis: int = -1) -> np.ndarray:
    """int64 ``(C, 256)``: how often each uint8 value occurs in each channel of ``pixels``.

    Pairs of neighbouring values of a channel are counted as one uint16 (a
    65536-bin count, then both marginals): ``np.bincount`` converts every
    input element to int64, so half the elements is about half the time.
    """
    channels = pixels.shape[channel_axis]
    out = np.zeros((channels, 256), dtype=np.int64)
    for c in range(channels):
        plane = np.ascontiguousarray(np.take(pixels, c, axis=channel_axis)).reshape(-1)
        even = len(plane) - len(plane) % 2
        pairs = np.bincount(plane[:even].view(np.uint16), minlength=65536).reshape(256, 256)
        out[c] = pairs.sum(axis=0) + pairs.sum(axis=1)  # both bytes of each pair
        out[c] += np.bincount(plane[even:], minlength=256)  # an odd one out
    return out


def stats_from_histograms(histograms: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std on the 0..1 scale from :func:`channel_histograms`."""
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for counts in histograms:
        hist = counts.astype(np.float64)
        count = hist.sum()
        mean = float((hist * values).sum() / count)
        variance = float((hist * (values - mean) ** 2).sum() / count)
        means.append(mean / 255.0)
        stds.append(variance ** 0.5 / 255.0)
    return means, stds


def channel_stats(pixels: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std on the 0..1 scale of uint8 ``(N, H, W, C)`` pixels.

    From a 256-bin histogram per channel: exact, and no float copy of the data.
    """
    return stats_from_histograms(channel_histograms(pixels))


def _check_manifest(manifest: pd.DataFrame, images: ImageParams, classes: list[str],
                    info: dict[str, Any] | None) -> None:
    """The manifest must be the one ``validate`` wrote for these ``images`` params."""
    if not manifest["decodable"].all():
        raise DataValidationFailed("the manifest lists undecodable images: run validate again")
    shape = (images.side, images.side, images.channels)
    built = manifest[["out_height", "out_width", "out_channels"]].drop_duplicates()
    if len(manifest) == 0 or len(built) != 1 or tuple(int(v) for v in built.iloc[0]) != shape:
        found = sorted({tuple(int(v) for v in row) for row in built.dropna().to_numpy()})
        raise DataValidationFailed(
            f"the manifest was built for images of shape {found}, params.images asks for "
            f"{shape}: run the validate stage again (dvc repro does)")
    wanted = images.model_dump(mode="json")
    if info is not None and info.get("images") != wanted:  # e.g. another resize mode
        raise DataValidationFailed(
            f"the manifest was built for images {info.get('images')}, params.images asks "
            f"for {wanted}: run the validate stage again (dvc repro does)")
    if manifest["class_id"].min() < 0 or manifest["class_id"].max() >= len(classes):
        raise DataValidationFailed("the manifest's class ids do not match the dataset's classes")


def _decode(raw: RawDataset, manifest: pd.DataFrame, images: ImageParams,
            workers: int | None, while_decoding: Any = None) -> np.ndarray:
    """All images of the manifest as uint8 ``(N, H, W, C)``, checked against its hashes."""
    n = len(manifest)
    pixels = np.empty(manifest_mod.pixels_shape(n, images), dtype=np.uint8)
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


def _handed_over(raw: RawDataset, manifest: pd.DataFrame, info: dict[str, Any] | None,
                 images: ImageParams, pixels_path: Path) -> np.ndarray | None:
    """``validate``'s pixels file, memory-mapped, if it can stand in for decoding; else ``None``.

    ``None`` when there is none (or the manifest does not vouch for one), or
    when ``data/raw`` changed since validation: decoding again then finds
    out which images changed. A file that is there but does not fit the
    manifest (shape, dtype) is refused; its pixels are checked by
    :func:`_verify`.
    """
    if info is None or "raw_sha256" not in info or not pixels_path.exists():
        log.info("prepare: no pixels file from validate at %s: decoding the images again",
                 pixels_path)
        return None
    if manifest_mod.raw_fingerprint(raw, manifest["location"].tolist()) != info["raw_sha256"]:
        log.warning("prepare: the raw data changed since validation: decoding the images "
                    "again to see which")
        return None
    expected = manifest_mod.pixels_shape(len(manifest), images)
    try:
        pixels = np.load(pixels_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataValidationFailed(f"{pixels_path}: not a pixels file ({exc}): run the "
                                   "validate stage again") from None
    if pixels.dtype != np.uint8 or pixels.shape != expected:
        raise DataValidationFailed(
            f"{pixels_path} holds {pixels.dtype} pixels of shape {pixels.shape}, the manifest "
            f"needs uint8 {expected}: run the validate stage again")
    return pixels


def _verify(pixels: np.ndarray, manifest: pd.DataFrame, pixels_path: Path,
            block: int = 4096) -> None:
    """Every row of ``pixels`` must hash to its manifest row's ``content_hash``."""
    expected = manifest["content_hash"].to_numpy()
    bad: list[int] = []
    for start in range(0, len(pixels), block):
        hashes = manifest_mod.hash_rows(pixels[start:start + block])
        bad += [start + i for i, digest in enumerate(hashes)
                if digest != expected[start + i]]
    if bad:
        shown = manifest.iloc[bad[:MAX_EXAMPLES]]
        names = shown["source_path"].where(shown["source_path"] != "", shown["location"])
        raise DataValidationFailed(
            f"{len(bad)} of {len(pixels)} rows of {pixels_path} differ from the validated "
            f"pixels (content_hash), e.g. {', '.join(names)}: run the validate stage again")


def _pack(pixels: np.ndarray, rows: np.ndarray, histograms: np.ndarray | None = None,
          block: int = 4096) -> np.ndarray:
    """``pixels[rows]`` as one C-contiguous uint8 ``(n, C, H, W)`` array, a block at a time.

    No full-size intermediate (gathered NHWC copy, then its transpose): only
    the result and one block. ``histograms`` (:func:`channel_histograms`), if
    given, accumulates the packed rows' value counts on the way.
    """
    n, height, width, channels = len(rows), *pixels.shape[1:]
    out = np.empty((n, channels, height, width), dtype=np.uint8)
    for start in range(0, n, block):
        part = pixels[rows[start:start + block]]
        packed = out[start:start + len(part)]
        packed[...] = part.transpose(0, 3, 1, 2)
        if histograms is not None:  # from the packed rows: each channel's plane is contiguous
            histograms += channel_histograms(packed, channel_axis=1)
    return out


def _as_split(images: np.ndarray, labels: np.ndarray, ids: list[str]) -> Any:
    import torch

    from refinery.formats.prepared import Split

    return Split(images=torch.from_numpy(images), labels=torch.from_numpy(labels.astype(np.int64)),
                 ids=ids)


def _source_name(raw_meta: dict[str, Any]) -> tuple[str, str]:
    """Where the data came from (the download URL, or ``builtin:digits``) and a short name
    for its data sets (the archive's name without extensions, or ``digits``)."""
    url = raw_meta.get("url")
    if not url:
        return "builtin:digits", "digits"
    stem = Path(str(url).split("?")[0].rstrip("/")).name.split(".")[0] or "data"
    return str(url), stem


def prepare(p: PrepareParams, *, images: ImageParams, seed: int, raw_dir: Path,
            manifest_path: Path, out_dir: Path, workers: int | None = None,
            pixels_path: Path | None = None,
            check: Callable[[dict[str, Any]], object] | None = None) -> PrepareResult:
    """Write ``out_dir`` (train/val/test/labeled ``.pt`` + ``meta.json``) from the manifest.

    The pixels come from ``pixels_path`` (default: ``pixels.npy`` next to the
    manifest, where ``validate`` writes them), or are decoded again from
    ``raw_dir`` when that cannot be used (see the module doc); ``workers``
    only matters then. ``check(meta)`` runs before anything is written (the
    pipeline checks the training plan there); if it raises, ``out_dir`` is
    left as it was.
    """
    started = time.perf_counter()
    raw = RawDataset.load(raw_dir)
    classes = raw.classes
    manifest, info = manifest_mod.read_manifest(manifest_path)
    _check_manifest(manifest, images, classes, info)
    torch_import = manifest_mod.BackgroundImport("torch")  # ~3 s of CPU, overlapped
    torch_import.start()
    pixels_path = (manifest_mod.pixels_path_for(manifest_path) if pixels_path is None
                   else Path(pixels_path))
    pixels = _handed_over(raw, manifest, info, images, pixels_path)
    decoded = pixels is None
    if pixels is None:
        # Decoding forks workers: not while another thread imports (a worker could inherit a
        # held import lock). The rare path, so it waits for the import rather than overlap it.
        torch_import.join()
        pixels = _decode(raw, manifest, images, workers)
    else:
        _verify(pixels, manifest, pixels_path)
    loaded = time.perf_counter()

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
    counts = {name: len(r) for name, r in rows.items()}
    histograms = np.zeros((images.channels, 256), dtype=np.int64)
    torch_import.join()
    import torch

    from refinery.formats.prepared import describe, save_split

    source, base = _source_name(raw.meta)
    datasets: dict[str, dict[str, Any]] = {}
    with fsutil.atomic_dir(out_dir) as tmp:
        for name, r in rows.items():  # one packed split in memory at a time
            packed = _pack(pixels, r, histograms if name == "train" else None)
            split = _as_split(packed, labels[r], ids[r].tolist())
            save_split(tmp / f"{name}.pt", split)
            datasets[name] = describe(split, classes, f"{base}-{name}", source)
            if name == "train":
                chosen = _as_split(packed[labeled], labels[r][labeled], [])
                datasets["labeled"] = describe(chosen, classes, f"{base}-labeled", source)
            del packed, split
        mean, std = stats_from_histograms(histograms)  # train only: no leak from val/test
        meta = {
            "classes": classes,
            "channels": images.channels,
            "size": images.side,
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
            "datasets": datasets,
        }
        torch.save({"indices": torch.from_numpy(labeled.astype(np.int64))}, tmp / "labeled.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if check is not None:
            check(meta)
    finished = time.perf_counter()
    result = PrepareResult(counts, len(labeled), classes, mean, std, decoded=decoded, timings={
        "pixels_seconds": loaded - started, "seconds": finished - started})
    log.info("prepare: %d train (%d labeled) + %d val + %d test images, %d classes, "
             "mean %s std %s, in %.1fs (pixels %s)", counts["train"], len(labeled),
             counts["val"], counts["test"], len(classes), [round(m, 4) for m in mean],
             [round(s, 4) for s in std], result.timings["seconds"],
             "decoded again" if decoded else "from validate")
    return result


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery prepare``. The whole
    training plan is checked against the new data before anything is written."""
    declared = stage_named("prepare")
    with stage.tracked(declared, params) as run:
        result = prepare(params.prepare, images=params.images, seed=params.data_seed,
                         raw_dir=paths.RAW,
                         manifest_path=paths.MANIFEST, out_dir=paths.PREPARED,
                         pixels_path=paths.PIXELS,
                         check=lambda meta: stage.check_plan(params, run, meta))
        stage.finish(declared, run, result.metrics(), artifacts=[paths.PREPARED / "meta.json"])
