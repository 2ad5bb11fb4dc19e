"""The ``validate`` stage: build the manifest and check it with Great Expectations.

Every bound comes from ``params.validate`` and ``params.images``; the checks
themselves are in :mod:`refinery.stages.validate.expectations`. The manifest, and the
converted pixels of its rows (``data/pixels.npy``, which ``prepare`` packs
instead of decoding every image again; see :mod:`refinery.formats.manifest`), are
written only when every critical expectation passes, so a later stage can
never run on data that failed (DVC stops at the non-zero exit that
:meth:`ValidationResult.raise_if_failed` causes). Reports (``validation.json``
and a Data Docs site) are written either way: a failure is exactly when
someone needs to read them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refinery import fsutil, paths, stage
from refinery.errors import DataValidationFailed
from refinery.formats import manifest as manifest_mod
from refinery.formats.raw import RawDataset
from refinery.params import ImageParams, Params, ValidateParams
from refinery.pipeline import stage_named
from refinery.stages.validate.expectations import (
    SPLITS,
    Failure,
    QuietGX,
    build_assets,
    duplicate_count,
    run_suites,
    shown_name,
)

log = logging.getLogger(__name__)


@dataclass
class ValidationResult:
    """What ``validate`` found; ``metrics()`` goes to ``metrics/validate.json`` and MLflow."""

    success: bool
    rows: dict[str, int]  # per split, after any drop
    classes: int
    undecodable: int
    dropped: int
    dropped_examples: tuple[str, ...]
    failures: list[Failure]
    warnings: list[Failure]
    evaluated: int  # expectations evaluated
    leaked: int  # test images with the same pixels as a train image
    duplicates: int  # images whose pixels repeat within their split (all copies counted)
    reports_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.timings.get("seconds", 0.0)

    def metrics(self) -> dict[str, float]:
        out = {f"rows_{split}": float(n) for split, n in self.rows.items()}
        out.update({
            "rows": float(sum(self.rows.values())),
            "classes": float(self.classes),
            "undecodable": float(self.undecodable),
            "dropped": float(self.dropped),
            "expectations": float(self.evaluated),
            "failed_expectations": float(len(self.failures)),
            "warnings": float(len(self.warnings)),
            "leaked_test_images": float(self.leaked),
            "duplicate_images": float(self.duplicates),
            "success": 1.0 if self.success else 0.0,
        })
        out.update({key: round(value, 3) for key, value in self.timings.items()})
        return out

    def summary(self) -> str:
        rows = " + ".join(f"{n} {split}" for split, n in self.rows.items())
        head = (f"data validation passed: {rows} rows, {self.classes} classes, "
                f"{self.evaluated} expectations"
                if self.success else
                f"data validation failed: {len(self.failures)} of {self.evaluated} "
                f"expectations ({rows} rows)")
        lines = [head]
        if self.dropped:
            shown = f", e.g. {', '.join(self.dropped_examples)}" if self.dropped_examples else ""
            lines.append(f"dropped {self.dropped} undecodable images "
                         f"(validate.drop_undecodable){shown}")
        lines += [f"  {failure.line()}" for failure in self.failures]
        lines += [f"  warning: {warning.line()}" for warning in self.warnings]
        lines.append(f"reports: {self.reports_dir / 'validation.json'}, "
                     f"{self.reports_dir / 'data_docs' / 'index.html'}")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.success:
            raise DataValidationFailed(self.summary())


# ---------------------------------------------------------------------- the stage


def _drop_undecodable(manifest: pd.DataFrame, p: ValidateParams,
                      ) -> tuple[pd.DataFrame, int, tuple[str, ...]]:
    """Apply ``drop_undecodable``: the kept rows, how many were dropped, a few of them."""
    bad = manifest[~manifest["decodable"]]
    if not p.drop_undecodable or bad.empty:
        return manifest, 0, ()
    examples = tuple(f"{shown_name(bad, i)} ({bad.at[i, 'error']})"
                     for i in bad.index[:p.max_examples])
    log.warning("validate: dropped %d undecodable images (validate.drop_undecodable), e.g. %s",
                len(bad), "; ".join(examples))
    return manifest[manifest["decodable"]].reset_index(drop=True), len(bad), examples


def validate(p: ValidateParams, *, images: ImageParams, raw_dir: Path, manifest_path: Path,
             reports_dir: Path, pixels_path: Path | None = None) -> ValidationResult:
    """Build the manifest of ``raw_dir``, validate it, write reports (and the manifest if ok).

    With the manifest goes ``pixels_path`` (default: ``pixels.npy`` next to
    the manifest), the converted pixels of its rows, for ``prepare``.
    """
    started = time.perf_counter()
    raw = RawDataset.load(raw_dir)
    pixels_path = (manifest_mod.pixels_path_for(manifest_path) if pixels_path is None
                   else Path(pixels_path))
    pixels_path.parent.mkdir(parents=True, exist_ok=True)
    # The workers write every image's pixels here while decoding; it becomes pixels_path
    # only if validation passes. Same folder: the rename is atomic and nothing is copied.
    handle, name = tempfile.mkstemp(prefix=f".{pixels_path.name}.", suffix=".decoding",
                                    dir=pixels_path.parent)
    os.close(handle)
    scratch = Path(name)
    try:
        result, manifest, keep, info = _check(p, images, raw, scratch, reports_dir, started)
        if result.success:
            _publish(manifest, info, keep, scratch, manifest_path, pixels_path)
        else:  # a stale manifest must not let prepare run
            fsutil.remove(manifest_path)
            fsutil.remove(pixels_path)
    finally:
        scratch.unlink(missing_ok=True)
    result.timings["seconds"] = time.perf_counter() - started
    if result.success:
        log.info("validate: %s", result.summary())
    else:  # the summary itself is the DataValidationFailed message the CLI prints
        log.error("validate: %d of %d expectations failed; manifest not written",
                  len(result.failures), result.evaluated)
    log.info("validate: %.1fs (manifest %.1fs, then waiting for the GX import %.1fs, GX %.1fs)",
             result.seconds, result.timings["manifest_seconds"],
             result.timings["gx_import_wait_seconds"], result.timings["gx_seconds"])
    return result


def _check(p: ValidateParams, images: ImageParams, raw: RawDataset, scratch: Path,
           reports_dir: Path, started: float,
           ) -> tuple[ValidationResult, pd.DataFrame, np.ndarray | None, dict[str, Any]]:
    """Build the manifest (pixels into ``scratch``), run GX, write the reports.

    Returns the result, the manifest as it will be written (after any drop),
    which rows of ``scratch`` it kept (``None``: all of them), and the info
    that goes into the manifest's metadata.
    """
    gx_import = manifest_mod.BackgroundImport("great_expectations")  # ~5 s, overlapped
    with QuietGX() as quiet_gx:
        manifest = manifest_mod.build_manifest(raw, images, while_decoding=gx_import.start,
                                               pixels_out=scratch)
        built = time.perf_counter()
        undecodable = int((~manifest["decodable"]).sum())
        decodable = manifest["decodable"].to_numpy(dtype=bool)
        manifest, dropped, dropped_examples = _drop_undecodable(manifest, p)
        # Hashing the raw files releases the GIL: it runs beside the GX import's tail.
        info = manifest_mod.build_info(raw, manifest, images)
        gx_import.join()  # before any GX import here: a concurrent one sees half-built modules
        quiet_gx.quiet()
        imported = time.perf_counter()
        assets = build_assets(p, images, manifest, raw.classes)
        with fsutil.atomic_dir(reports_dir) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GX warns per metric (pandas dtype notes and such)
            problems, evaluated, serialized = run_suites(assets, tmp / "data_docs",
                                                         p.max_examples)
            counts = manifest["split"].value_counts()
            result = ValidationResult(
                success=not any(f.severity == "critical" for f in problems),
                rows={split: int(counts.get(split, 0)) for split in SPLITS},
                classes=len(raw.classes),
                undecodable=undecodable,
                dropped=dropped,
                dropped_examples=dropped_examples,
                failures=[f for f in problems if f.severity == "critical"],
                warnings=[f for f in problems if f.severity != "critical"],
                evaluated=evaluated,
                leaked=int(assets["leakage"][0]["train_match"].notna().sum()),
                duplicates=duplicate_count(assets["images"][0]),
                reports_dir=Path(reports_dir),
                timings={"manifest_seconds": built - started,
                         "gx_import_wait_seconds": imported - built,
                         "gx_seconds": time.perf_counter() - imported},
            )
            _write_report(tmp / "validation.json", result, p, images, serialized)
    return result, manifest, decodable if dropped else None, info


def _publish(manifest: pd.DataFrame, info: dict[str, Any], keep: np.ndarray | None,
             scratch: Path, manifest_path: Path, pixels_path: Path) -> None:
    """Write the pixels, then the manifest that vouches for them, each atomically."""
    with fsutil.atomic_path(pixels_path) as tmp_pixels:
        if keep is None:
            mode = tmp_pixels.stat().st_mode  # atomic_path's permissions, not mkstemp's 0600
            os.replace(scratch, tmp_pixels)
            os.chmod(tmp_pixels, mode)
        else:  # drop_undecodable dropped rows: keep the pixels aligned with the manifest
            manifest_mod.copy_rows(scratch, tmp_pixels, keep)
    with fsutil.atomic_path(manifest_path) as tmp_manifest:
        manifest_mod.write_manifest(manifest, tmp_manifest, info)


def _write_report(path: Path, result: ValidationResult, p: ValidateParams,
                  images: ImageParams, serialized: dict[str, Any]) -> None:
    report = {
        "success": result.success,
        "summary": result.summary(),
        "rows": result.rows,
        "undecodable": result.undecodable,
        "dropped": result.dropped,
        "dropped_examples": list(result.dropped_examples),
        "leaked_test_images": result.leaked,
        "duplicate_images": result.duplicates,
        "failures": [dataclasses.asdict(f) for f in result.failures],
        "warnings": [dataclasses.asdict(f) for f in result.warnings],
        "params": {"validate": p.model_dump(mode="json"), "images": images.model_dump()},
        "great_expectations": serialized,
    }
    fsutil.write_text(path, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")


def main(params: Params, args: argparse.Namespace) -> None:
    """The adapter (:mod:`refinery.stage`): ``python -m refinery validate``."""
    declared = stage_named("validate")
    with stage.tracked(declared, params) as run:
        result = validate(params.validate_params, images=params.images, raw_dir=paths.RAW,
                          manifest_path=paths.MANIFEST, reports_dir=declared.reports,
                          pixels_path=paths.PIXELS)
        run.log_artifacts(declared.reports, "validation")
        stage.finish(declared, run, result.metrics())
        result.raise_if_failed()
