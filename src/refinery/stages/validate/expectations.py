"""The Great Expectations side of ``validate``: derived frames, checks, one GX run.

Row-level checks run on the manifest; the checks GX has no single expectation
for (rows per split, each class's share of its split, train/test leakage) run
on small frames derived from it, validated as more batches of the same run in
the same ephemeral context, so all of them land in one result and one Data
Docs site. Each check carries how to name a failing row, so the stage summary
says which file failed and why, not just how many rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from refinery.formats import manifest as manifest_mod
from refinery.params import ImageParams, ValidateParams

DOCS_SITE = "refinery"  # the ephemeral context already has a "local_site" in a temp folder
SPLITS = ("train", "test")
# Data Docs list up to this many unexpected values; the summary shows max_examples of them.
DOCS_EXAMPLES = 20

Example = Callable[[pd.DataFrame, Any], str]


@dataclass(frozen=True)
class Failure:
    """One expectation that did not pass, in the words a user needs to fix the data."""

    description: str
    asset: str
    expectation: str  # the GX expectation type
    severity: str  # "critical" fails the stage; "warning" is reported only
    unexpected: int
    total: int
    unit: str
    examples: tuple[str, ...]
    exception: str = ""

    def line(self) -> str:
        if self.exception:
            return f"{self.description}: could not be evaluated ({self.exception})"
        text = f"{self.description}: {self.unexpected} of {self.total} {self.unit} failed"
        return text + (f", e.g. {', '.join(self.examples)}" if self.examples else "")


# ----------------------------------------------------------------- derived frames


def display_names(frame: pd.DataFrame) -> pd.Series:
    """How reports name images: the path in the source archive, else the raw location.

    Packed records live at ``images.bin#<offset>+<length>``, which tells a user
    nothing; ``source_path`` (``cifar10-jpeg/train/cat/0001.jpg``) does.
    """
    return frame["source_path"].where(frame["source_path"] != "", frame["location"])


def shown_name(frame: pd.DataFrame, index: Any) -> str:
    """:func:`display_names` for one row."""
    source = str(frame.at[index, "source_path"])
    return source or str(frame.at[index, "location"])


def images_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest plus columns that make GX's checks fast and its Data Docs readable.

    ``label`` ("3:cat") replaces a column-pair check, which GX runs row by row
    (as it does range checks on nullable ``Int64`` columns: those without
    nulls become plain ``int64``);
    ``decode_error`` ("files/x.jpg: cannot identify image file") is what the
    decode expectation checks, so Data Docs list the failing files, not ``False``.
    """
    frame = manifest.copy()
    for column in ("width", "height", "out_height", "out_width", "out_channels"):
        if not frame[column].hasnans:  # GX checks int64 in one vectorised pass, Int64 per row
            frame[column] = frame[column].astype("int64")
    errors = display_names(frame) + ": " + frame["error"]
    frame["decode_error"] = errors.where(~frame["decodable"])
    frame["label"] = frame["class_id"].astype(str) + ":" + frame["class_name"]
    frame["split_hash"] = (frame["split"] + ":" + frame["content_hash"]).where(
        frame["content_hash"].notna())
    return frame


def splits_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row: ``train_rows``, ``test_rows``."""
    counts = manifest["split"].value_counts()
    return pd.DataFrame({f"{split}_rows": [int(counts.get(split, 0))] for split in SPLITS})


def class_balance_frame(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per (split, class) of the full class set: a missing class has share 0."""
    counts = manifest.groupby(["split", "class_id"]).size()
    rows = []
    for split in SPLITS:
        total = int((manifest["split"] == split).sum())
        for class_id, name in enumerate(classes):
            count = int(counts.get((split, class_id), 0))
            rows.append({"split": split, "class_id": class_id, "class_name": name,
                         "count": count, "split_rows": total,
                         "share": count / total if total else 0.0})
    return pd.DataFrame(rows)


def leakage_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per decodable test image; ``train_match``: a train image with the same pixels."""
    hashed = manifest[manifest["content_hash"].notna()]
    train = display_names(hashed)[hashed["split"] == "train"]
    train_hashes = hashed.loc[train.index, "content_hash"]
    first_train = pd.Series(train.to_numpy(), index=train_hashes.to_numpy())
    first_train = first_train[~first_train.index.duplicated()]
    test = hashed.loc[hashed["split"] == "test",
                      ["id", "location", "source_path", "content_hash"]].reset_index(drop=True)
    test["train_match"] = test["content_hash"].map(first_train)
    test["leak"] = (display_names(test) + " has the pixels of " + test["train_match"]).where(
        test["train_match"].notna())
    return test


def duplicate_count(frame: pd.DataFrame) -> int:
    """Images whose pixels repeat within their split, every copy counted (an images_frame)."""
    keys = frame["split_hash"].dropna()
    return int(keys.duplicated(keep=False).sum())


# -------------------------------------------------------------------- the checks


@dataclass(frozen=True)
class Check:
    """An expectation plus how to name a failing row of its frame in the summary."""

    expectation: Any  # a great_expectations.expectations.Expectation
    unit: str
    example: Example


def _row_example(detail: Callable[[pd.DataFrame, Any], str]) -> Example:
    return lambda frame, i: f"{shown_name(frame, i)} ({detail(frame, i)})"


def _image_checks(p: ValidateParams, images: ImageParams, classes: list[str]) -> list[Check]:
    import great_expectations.expectations as gxe

    def value(column: str, fmt: str = "{}") -> Example:
        return _row_example(lambda f, i: f"{column} {fmt.format(f.at[i, column])}")

    def same_pixels(frame: pd.DataFrame, i: Any) -> str:
        others = frame.index[(frame["split_hash"] == frame.at[i, "split_hash"])
                             & (frame.index != i)]
        return f"same pixels as {shown_name(frame, others[0])}" if len(others) else "repeated"

    size, channels = images.side, images.channels
    lo, hi = p.source_side
    checks = [
        Check(gxe.ExpectColumnValuesToNotBeNull(
            column=column, description=f"expect no null {column}"), "rows",
            _row_example(lambda f, i, c=column: f"{c} is null"))
        for column in manifest_mod.REQUIRED_COLUMNS
    ]
    checks += [
        Check(gxe.ExpectColumnValuesToBeUnique(column="id", description="expect unique ids"),
              "rows", value("id", "{!r} repeats")),
        Check(gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS),
            description="expect every record in the train or test split"),
            "rows", value("split", "{!r}")),
        Check(gxe.ExpectColumnValuesToBeNull(
            column="decode_error", description="expect images to decode"),
            "rows", _row_example(lambda f, i: str(f.at[i, "error"]))),
        Check(gxe.ExpectColumnValuesToBeBetween(
            column="class_id", min_value=0, max_value=len(classes) - 1,
            description=f"expect class ids in 0..{len(classes) - 1}"),
            "rows", value("class_id")),
        Check(gxe.ExpectColumnValuesToBeInSet(
            column="class_name", value_set=classes,
            description="expect class names from the dataset's classes"),
            "rows", value("class_name", "{!r}")),
        Check(gxe.ExpectColumnValuesToBeInSet(
            column="label", value_set=[f"{i}:{name}" for i, name in enumerate(classes)],
            description="expect each class name to match its class id"),
            "rows", value("label", "{!r}")),
        Check(gxe.ExpectColumnValuesToBeBetween(
            column="width", min_value=lo, max_value=hi,
            description=f"expect source widths in {lo}..{hi} px"),
            "rows", value("width", "{} px")),
        Check(gxe.ExpectColumnValuesToBeBetween(
            column="height", min_value=lo, max_value=hi,
            description=f"expect source heights in {lo}..{hi} px"),
            "rows", value("height", "{} px")),
    ]
    checks += [
        Check(gxe.ExpectColumnValuesToBeInSet(
            column=column, value_set=[want],
            description=f"expect converted {column.removeprefix('out_')} == {want}"),
            "rows", value(column))
        for column, want in (("out_height", size), ("out_width", size),
                             ("out_channels", channels))
    ]
    mean_lo, mean_hi = p.pixel_mean
    checks += [
        Check(gxe.ExpectColumnValuesToBeBetween(
            column="pixel_mean", min_value=mean_lo, max_value=mean_hi,
            description=f"expect mean pixel value in {mean_lo:g}..{mean_hi:g}"),
            "rows", value("pixel_mean", "{:.1f}")),
        Check(gxe.ExpectColumnValuesToBeBetween(
            column="pixel_std", min_value=p.min_pixel_std,
            description=f"expect pixel std >= {p.min_pixel_std:g} (not blank)"),
            "rows", value("pixel_std", "{:.2f}")),
        Check(gxe.ExpectColumnValuesToBeUnique(
            column="split_hash", severity="warning",
            description="expect no exact duplicate images within a split"),
            "rows", _row_example(same_pixels)),
    ]
    return checks


def _split_checks(p: ValidateParams) -> list[Check]:
    import great_expectations.expectations as gxe

    checks = []
    for split in SPLITS:
        lo, hi = getattr(p.rows, split)
        column = f"{split}_rows"
        checks.append(Check(gxe.ExpectColumnValuesToBeBetween(
            column=column, min_value=lo, max_value=hi,
            description=f"expect {lo} to {hi} rows in the {split} split"),
            "splits", lambda f, i, c=column, s=split: f"{s} has {f.at[i, c]} rows"))
    return checks


def _class_checks(p: ValidateParams) -> list[Check]:
    import great_expectations.expectations as gxe

    def example(frame: pd.DataFrame, i: Any) -> str:
        row = frame.loc[i]
        return (f"{row['split']}/{row['class_name']}: {row['share']:.2%} "
                f"({row['count']} of {row['split_rows']} rows)")

    return [Check(gxe.ExpectColumnValuesToBeBetween(
        column="share", min_value=p.min_class_fraction,
        description=f"expect every class to be at least {p.min_class_fraction:.1%} of its split"),
        "classes", example)]


def _leakage_checks() -> list[Check]:
    import great_expectations.expectations as gxe

    return [Check(gxe.ExpectColumnValuesToBeNull(
        column="leak",
        description="expect no test image with the same pixels as a train image"),
        "test images",
        lambda f, i: f"{shown_name(f, i)} (same pixels as {f.at[i, 'train_match']})")]


# -------------------------------------------------------------------- running GX


class QuietGX:
    """Keep GX's INFO chatter (import-time registrations, temp folders) out of stage logs.

    Raises every ``great_expectations`` logger to WARNING while the stage runs
    and restores them after. ``quiet()`` is called again once GX is imported,
    because some of its modules set their own logger level at import.
    """

    def __init__(self) -> None:
        self.saved: dict[str, int] = {}

    def quiet(self) -> None:
        names = ["great_expectations", *(name for name in logging.root.manager.loggerDict
                                         if name.startswith("great_expectations."))]
        for name in names:
            logger = logging.getLogger(name)
            if name == "great_expectations" or logger.level != logging.NOTSET:
                self.saved.setdefault(name, logger.level)
                logger.setLevel(max(logger.level, logging.WARNING))

    def __enter__(self) -> QuietGX:
        self.quiet()
        return self

    def __exit__(self, *exc: object) -> None:
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)


def _context(docs_dir: Path) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False,
                                                         metric_calculations=False)
    context.add_data_docs_site(site_name=DOCS_SITE, site_config={
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    return context


def _failure(check: Check, asset: str, outcome: Any, frame: pd.DataFrame,
             max_examples: int) -> Failure:
    config = outcome.expectation_config
    result = outcome.result or {}
    info = outcome.exception_info or {}
    exception = ""
    if info.get("raised_exception"):
        exception = str(info.get("exception_message", "exception"))
    indices = result.get("partial_unexpected_index_list") or []
    examples = tuple(check.example(frame, i) for i in indices[:max_examples])
    return Failure(
        description=check.expectation.description or config.type,
        asset=asset,
        expectation=config.type,
        severity=str(getattr(check.expectation.severity, "value", check.expectation.severity)),
        unexpected=int(result.get("unexpected_count") or 0),
        total=int(result.get("element_count") or len(frame)),
        unit=check.unit,
        examples=examples,
        exception=exception,
    )


def run_suites(assets: dict[str, tuple[pd.DataFrame, list[Check]]], docs_dir: Path,
               max_examples: int) -> tuple[list[Failure], int, dict[str, Any]]:
    """Validate each frame with its checks in one GX context; build Data Docs once.

    Why one ValidationDefinition per frame and no Checkpoint: a Checkpoint
    passes the same ``batch_parameters`` (thus the same dataframe) to all of
    its validation definitions. Each run still lands in the context's result
    store, so one ``build_data_docs`` renders all of them on one site.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    context = _context(docs_dir)
    source = context.data_sources.add_pandas("refinery")
    run_id = RunIdentifier(run_name="validate")
    result_format = {"result_format": "SUMMARY",
                     "partial_unexpected_count": max(DOCS_EXAMPLES, max_examples)}
    failures: list[Failure] = []
    evaluated = 0
    serialized: dict[str, Any] = {}
    for asset, (frame, checks) in assets.items():
        batch = source.add_dataframe_asset(asset).add_batch_definition_whole_dataframe(asset)
        # Expectations given up front: add_expectation on a stored suite re-saves it each time.
        suite = context.suites.add(gx.ExpectationSuite(
            name=f"refinery.{asset}", expectations=[check.expectation for check in checks]))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=asset, data=batch, suite=suite))
        outcome = definition.run(batch_parameters={"dataframe": frame},
                                 result_format=result_format, run_id=run_id)
        serialized[asset] = outcome.to_json_dict()
        by_id = {check.expectation.id: check for check in checks}  # ids set by suites.add
        if None in by_id or len(by_id) != len(checks):
            raise RuntimeError(f"GX did not give the {asset} expectations distinct ids")
        for item in outcome.results:
            evaluated += 1
            if not item.success:
                check = by_id[item.expectation_config.id]
                failures.append(_failure(check, asset, item, frame, max_examples))
    context.build_data_docs(site_names=[DOCS_SITE])
    return failures, evaluated, serialized


def build_assets(p: ValidateParams, images: ImageParams, manifest: pd.DataFrame,
                 classes: list[str]) -> dict[str, tuple[pd.DataFrame, list[Check]]]:
    """Each GX data asset (a frame) with its checks; all bounds come from the params."""
    return {
        "images": (images_frame(manifest), _image_checks(p, images, classes)),
        "splits": (splits_frame(manifest), _split_checks(p)),
        "class_balance": (class_balance_frame(manifest, classes), _class_checks(p)),
        "leakage": (leakage_frame(manifest), _leakage_checks()),
    }
