"""The ``download`` stage: fetch the configured source and write ``data/raw``.

Order matters for the guarantees users rely on: the archive is fetched and
verified first (a bad checksum stops before anything is written), then
unpacked and converted inside :func:`refinery.fsutil.atomic_dir`, so
``data/raw`` is either the complete new dataset or untouched, never partial.
Image folders are streamed into one blob (``images.bin``, see ``raw.py``);
the CIFAR-10 binary batches, six files, are extracted and parsed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from refinery import fsutil, paths, stage
from refinery.formats import raw
from refinery.params import DownloadParams, Params
from refinery.pipeline import stage_named
from refinery.stages.download import archive, fetch, sources

log = logging.getLogger(__name__)


@dataclass
class DownloadResult:
    """What the stage produced; ``metrics()`` goes to ``metrics/download.json`` and MLflow."""

    source: str
    sha256: str  # of the fetched archive, or of the builtin data
    url: str | None  # redacted (no credentials)
    kind: str
    classes: list[str]
    counts: dict[str, int]
    archive_bytes: int = 0
    raw_bytes: int = 0
    fetch_seconds: float = 0.0
    extract_seconds: float = 0.0
    seconds: float = 0.0
    network_bytes: int = 0
    http_requests: int = 0
    http_retries: int = 0
    reused_cache: bool = False
    extracted_files: int = 0
    skipped_junk: int = 0

    def metrics(self) -> dict[str, float]:
        return {
            "train_records": float(self.counts.get("train", 0)),
            "test_records": float(self.counts.get("test", 0)),
            "classes": float(len(self.classes)),
            "archive_bytes": float(self.archive_bytes),
            "raw_bytes": float(self.raw_bytes),
            "fetch_seconds": round(self.fetch_seconds, 3),
            "extract_seconds": round(self.extract_seconds, 3),
            "seconds": round(self.seconds, 3),
            "network_bytes": float(self.network_bytes),
            "http_requests": float(self.http_requests),
            "http_retries": float(self.http_retries),
            "reused_cache": 1.0 if self.reused_cache else 0.0,
            "extracted_files": float(self.extracted_files),
            "skipped_junk": float(self.skipped_junk),
        }


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _write(root: Path, data: sources.SourceData, meta: dict[str, object]) -> None:
    raw.write_records(root, data.records)
    raw.write_meta(root, {
        **meta, **data.meta, "kind": data.kind, "classes": data.classes,
        "counts": data.counts(), "class_counts": data.class_counts(),
    })


def _cifar10_binary(path: Path, tmp: Path,
                    p: DownloadParams) -> tuple[sources.SourceData, archive.ExtractStats]:
    """Six batch files: extracted as files (cheap at that count), parsed, then removed."""
    extracted = tmp / ".extract"
    stats = archive.extract(path, extracted, p.limits, skip=sources.is_junk)
    data = sources.cifar10_binary(extracted, tmp)
    shutil.rmtree(extracted)
    return data, stats


def download(p: DownloadParams, *, out_dir: Path, cache_dir: Path, seed: int) -> DownloadResult:
    """Fetch ``p``'s source and write it to ``out_dir`` in the raw layout (see ``raw.py``)."""
    started = time.perf_counter()
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    if p.source == "builtin":
        if p.url or p.checksum:
            log.warning("download.source is builtin: download.url/checksum are ignored")
        with fsutil.atomic_dir(out_dir) as tmp:
            data, sha256 = sources.builtin_digits(tmp, p.test_fraction, seed)
            _write(tmp, data, {"source": "builtin", "url": None, "checksum": None,
                               "sha256": sha256})
        result = DownloadResult("builtin:digits", sha256, None, data.kind, data.classes,
                                data.counts())
    else:
        url, checksum = p.resolved_url(), p.resolved_checksum()
        assert url is not None  # the params schema requires one for image-folder
        fetched = fetch.fetch(url, cache_dir, checksum, p.http)
        if checksum is None:
            log.warning("unpinned source %s: no download.checksum; its sha256 is %s (set "
                        "download.checksum: sha256:%s to pin it)", fetched.url,
                        fetched.sha256, fetched.sha256)
        extract_started = time.perf_counter()
        with fsutil.atomic_dir(out_dir) as tmp:
            if p.source == "cifar10-binary":
                data, stats = _cifar10_binary(fetched.path, tmp, p)
            else:
                packed = archive.pack(fetched.path, tmp / ".archive.bin", p.limits,
                                      skip=sources.is_junk)
                data, stats = sources.image_folder(packed, tmp, p, seed), packed.stats
            _write(tmp, data, {"source": p.source, "url": fetched.url, "checksum": checksum,
                               "sha256": fetched.sha256, "archive_bytes": fetched.size})
        result = DownloadResult(
            p.source, fetched.sha256, fetched.url, data.kind, data.classes, data.counts(),
            archive_bytes=fetched.size, fetch_seconds=fetched.seconds,
            extract_seconds=time.perf_counter() - extract_started,
            network_bytes=fetched.network_bytes, http_requests=fetched.requests,
            http_retries=fetched.retries, reused_cache=fetched.reused_cache,
            extracted_files=stats.files, skipped_junk=stats.skipped,
        )
    result.raw_bytes = _tree_bytes(out_dir)
    result.seconds = time.perf_counter() - started
    log.info("download: %s -> %s: %d train + %d test records, %d classes (%s) in %.1fs",
             result.source, out_dir, result.counts["train"], result.counts["test"],
             len(result.classes), result.kind, result.seconds)
    return result


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery download``."""
    declared = stage_named("download")
    with stage.tracked(declared, params) as run:
        result = download(params.download, out_dir=paths.RAW, cache_dir=paths.DOWNLOAD_CACHE,
                          seed=params.data_seed)
        run.set_tags({"refinery.source": result.source, "refinery.source_sha256": result.sha256})
        stage.finish(declared, run, result.metrics(), artifacts=[paths.RAW / "dataset.json"])
