"""The validate stage: manifest building and the Great Expectations checks.

Each failure case plants one defect in an otherwise clean small dataset and
checks that the summary names the expectation and the offending file, that
reports are written, and that no manifest (nor pixels file) is left for
``prepare``.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rawdata import Extra, Spec, arrays_dataset, encode, files_dataset, picture, rewrite_records

from refinery.errors import DataValidationFailed
from refinery.formats import manifest as manifest_mod
from refinery.formats.raw import RawDataset
from refinery.params import ImageParams, ValidateParams
from refinery.stages.validate import ValidationResult, validate

IMAGES = ImageParams(side=8, channels=3)


def vparams(**changes: object) -> ValidateParams:
    """Bounds that fit the default ``Spec`` (3 classes x 12 train / 4 test images)."""
    values: dict[str, object] = {"rows": {"train": (30, 100), "test": (10, 50)},
                                 "min_class_fraction": 0.1, "max_examples": 3}
    values.update(changes)
    return ValidateParams(**values)


def run(tmp_path: Path, p: ValidateParams | None = None,
        images: ImageParams = IMAGES) -> ValidationResult:
    return validate(p or vparams(), images=images, raw_dir=tmp_path / "raw",
                    manifest_path=tmp_path / "manifest.parquet",
                    reports_dir=tmp_path / "reports")


def assert_handed_over(tmp_path: Path, images: ImageParams = IMAGES) -> np.ndarray:
    """The pixels file validate wrote: one row per manifest row, each with its content_hash."""
    manifest, info = manifest_mod.read_manifest(tmp_path / "manifest.parquet")
    pixels = np.load(tmp_path / "pixels.npy")
    assert pixels.dtype == np.uint8
    assert pixels.shape == (len(manifest), images.side, images.side, images.channels)
    assert manifest_mod.hash_rows(pixels) == manifest["content_hash"].tolist()
    raw = RawDataset.load(tmp_path / "raw")
    assert info == {"images": images.model_dump(mode="json"),
                    "pixels_shape": list(pixels.shape),
                    "raw_sha256": manifest_mod.raw_fingerprint(raw,
                                                               manifest["location"].tolist())}
    assert_no_scratch(tmp_path)
    return pixels


def assert_no_scratch(tmp_path: Path) -> None:
    assert not list(tmp_path.glob(".pixels.npy.*")), "validate left its scratch pixels behind"


def assert_failed(result: ValidationResult, tmp_path: Path, *phrases: str) -> None:
    assert not result.success
    summary = result.summary()
    for phrase in phrases:
        assert phrase in summary, f"{phrase!r} not in:\n{summary}"
    assert not (tmp_path / "manifest.parquet").exists()
    assert not (tmp_path / "pixels.npy").exists()
    assert_no_scratch(tmp_path)
    report = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert report["success"] is False and report["summary"] == summary
    assert (tmp_path / "reports" / "data_docs" / "index.html").exists()
    with pytest.raises(DataValidationFailed) as raised:
        result.raise_if_failed()
    assert str(raised.value) == summary
    assert result.metrics()["failed_expectations"] == len(result.failures) >= 1


def jpeg_pair() -> list[Extra]:
    """A truncated JPEG and a text file named .jpg."""
    good = encode(picture(np.random.default_rng(9), 10, 3, 0), "JPEG", quality=90)
    return [Extra("train", "cat", "truncated.jpg", good[:-10]),  # cut inside the scan data
            Extra("test", "dog", "notes.jpg", b"these are not pixels\n")]


# ------------------------------------------------------------------------ passing


@pytest.mark.parametrize("kind", ["files", "packed"])
def test_clean_dataset_passes_and_writes_everything(tmp_path: Path, kind: str) -> None:
    records = files_dataset(tmp_path / "raw", kind=kind)
    result = run(tmp_path)
    assert result.success, result.summary()
    assert result.summary().startswith("data validation passed: 36 train + 12 test rows")
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert list(manifest.columns) == list(manifest_mod.MANIFEST_COLUMNS)
    assert len(manifest) == 48 and manifest["decodable"].all()
    assert (manifest["error"] == "").all()
    assert set(manifest[["out_height", "out_width", "out_channels"]].drop_duplicates()
               .itertuples(index=False, name=None)) == {(8, 8, 3)}
    assert (manifest[["width", "height"]] == 10).all().all()
    assert set(manifest["mode"]) == {"RGB"}
    assert manifest["content_hash"].str.fullmatch(r"[0-9a-f]{32}").all()
    assert manifest["content_hash"].is_unique
    raw = RawDataset.load(tmp_path / "raw")
    assert manifest["nbytes"].tolist() == [len(raw.read_bytes(loc))
                                           for loc in manifest["location"]]
    assert manifest["source_path"].tolist() == records["source_path"].tolist()
    pixels = assert_handed_over(tmp_path)
    for row in (0, 47):  # the pixels convert() gives, in manifest order
        assert np.array_equal(pixels[row],
                              manifest_mod.convert(raw, manifest.at[row, "location"], IMAGES)[1])

    report = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert report["success"] is True and report["failures"] == []
    assert set(report["great_expectations"]) == {"images", "splits", "class_balance", "leakage"}
    docs = tmp_path / "reports" / "data_docs"
    assert (docs / "index.html").exists()
    pages = list((docs / "validations").rglob("*.html"))
    assert len(pages) == 4, pages  # one per validated frame, all in one site

    metrics = result.metrics()
    assert metrics["rows_train"] == 36 and metrics["rows_test"] == 12
    assert metrics["classes"] == 3 and metrics["undecodable"] == 0 and metrics["dropped"] == 0
    assert metrics["failed_expectations"] == 0 and metrics["expectations"] >= 20
    assert metrics["seconds"] > 0 and metrics["manifest_seconds"] > 0


def test_arrays_dataset_passes(tmp_path: Path) -> None:
    arrays_dataset(tmp_path / "raw")
    result = run(tmp_path, images=ImageParams(side=8, channels=1))
    assert result.success, result.summary()
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert set(manifest["mode"]) == {"L"} and (manifest["nbytes"] == 64).all()
    assert (manifest["out_channels"] == 1).all()
    pixels = assert_handed_over(tmp_path, ImageParams(side=8, channels=1))
    assert np.array_equal(pixels[:36], np.load(tmp_path / "raw" / "arrays" / "train.npy"))


def test_rerun_replaces_reports_and_keeps_manifest_bytes(tmp_path: Path) -> None:
    files_dataset(tmp_path / "raw")
    assert run(tmp_path).success
    first = (tmp_path / "manifest.parquet").read_bytes()
    pixels = (tmp_path / "pixels.npy").read_bytes()
    stale = tmp_path / "reports" / "stale.txt"
    stale.write_text("old")
    assert run(tmp_path, vparams(max_examples=4)).success
    assert not stale.exists()
    # byte-identical: DVC then skips prepare when only validate's params changed
    assert (tmp_path / "manifest.parquet").read_bytes() == first
    assert (tmp_path / "pixels.npy").read_bytes() == pixels
    assert_no_scratch(tmp_path)


# ------------------------------------------------------------------------ failing


@pytest.mark.parametrize("kind", ["files", "packed"])
def test_undecodable_images_fail_with_their_files(tmp_path: Path, kind: str) -> None:
    files_dataset(tmp_path / "raw", extras=jpeg_pair(), kind=kind)
    (tmp_path / "manifest.parquet").write_bytes(b"from an earlier, passing run")
    (tmp_path / "pixels.npy").write_bytes(b"from an earlier, passing run")
    result = run(tmp_path)
    folder = "files" if kind == "files" else "mydata"  # packed: named by source_path
    assert_failed(result, tmp_path,
                  "expect images to decode: 2 of 50 rows failed",
                  f"{folder}/train/cat/truncated.jpg (image file is truncated",
                  f"{folder}/test/dog/notes.jpg (cannot identify image file)")
    assert "0x" not in result.summary()  # no memory addresses from PIL's messages
    assert result.metrics()["undecodable"] == 2 and result.metrics()["dropped"] == 0
    assert len(result.failures) == 1  # nulls in pixel columns are not reported twice
    report = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert report["failures"][0]["examples"][0].startswith(f"{folder}/train/cat/truncated.jpg")
    pages = list((tmp_path / "reports" / "data_docs" / "validations").rglob("*images*.html"))
    assert f"{folder}/test/dog/notes.jpg: cannot identify image file" in pages[0].read_text()


def test_drop_undecodable_drops_counts_and_logs(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    files_dataset(tmp_path / "raw", extras=jpeg_pair())
    with caplog.at_level(logging.WARNING, logger="refinery.stages.validate"):
        result = run(tmp_path, vparams(drop_undecodable=True))
    assert result.success, result.summary()
    assert result.metrics()["dropped"] == 2 and result.metrics()["undecodable"] == 2
    assert "dropped 2 undecodable images (validate.drop_undecodable)" in result.summary()
    assert "files/test/dog/notes.jpg" in result.summary()
    assert any("dropped 2 undecodable" in r.getMessage() for r in caplog.records)
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert len(manifest) == 48 and manifest["decodable"].all()
    assert manifest["pixel_std"].notna().all()
    assert_handed_over(tmp_path)  # the dropped rows' pixels are dropped too


def test_same_picture_in_train_and_test_is_leakage(tmp_path: Path) -> None:
    from PIL import Image

    source = tmp_path / "raw" / "files" / "train" / "cat" / "0003.png"
    files_dataset(tmp_path / "raw")
    copy = source.read_bytes()
    with Image.open(source) as image:
        buffer = io.BytesIO()
        image.save(buffer, format="BMP")  # other bytes, same pixels
    files_dataset(tmp_path / "raw", extras=[Extra("test", "cat", "copy.png", copy),
                                            Extra("test", "dog", "again.bmp",
                                                  buffer.getvalue())])
    result = run(tmp_path)
    assert_failed(result, tmp_path,
                  "expect no test image with the same pixels as a train image: "
                  "2 of 14 test images failed",
                  "files/test/cat/copy.png (same pixels as files/train/cat/0003.png)",
                  "files/test/dog/again.bmp (same pixels as files/train/cat/0003.png)")
    assert result.metrics()["leaked_test_images"] == 2


def test_rare_class_fails(tmp_path: Path) -> None:
    records = files_dataset(tmp_path / "raw", Spec(per_class={"train": 20, "test": 4}))
    rare = (records["split"] == "train") & (records["class_name"] == "frog")
    keep = ~rare | records["location"].str.endswith("0000.png")
    rewrite_records(tmp_path / "raw", records[keep])
    result = run(tmp_path)
    assert_failed(result, tmp_path,
                  "expect every class to be at least 10.0% of its split: 1 of 6 classes failed",
                  "train/frog: 2.44% (1 of 41 rows)")


def test_row_counts_out_of_bounds_fail(tmp_path: Path) -> None:
    files_dataset(tmp_path / "raw")
    result = run(tmp_path, vparams(rows={"train": (100, 1000), "test": (1, 5)}))
    assert_failed(result, tmp_path,
                  "expect 100 to 1000 rows in the train split: 1 of 1 splits failed, "
                  "e.g. train has 36 rows",
                  "expect 1 to 5 rows in the test split: 1 of 1 splits failed, "
                  "e.g. test has 12 rows")
    assert len(result.failures) == 2


def test_blank_image_fails_std(tmp_path: Path) -> None:
    blank = encode(np.full((10, 10, 3), 128, dtype=np.uint8), "PNG")
    files_dataset(tmp_path / "raw", extras=[Extra("train", "dog", "blank.png", blank)])
    result = run(tmp_path)
    assert_failed(result, tmp_path,
                  "expect pixel std >= 1 (not blank): 1 of 49 rows failed",
                  "files/train/dog/blank.png (pixel_std 0.00)")
    assert len(result.failures) == 1


def test_dark_image_fails_mean(tmp_path: Path) -> None:
    dark = picture(np.random.default_rng(1), 10, 3, 0) // 40  # values 0..6, mean ~3
    files_dataset(tmp_path / "raw", extras=[Extra("test", "cat", "dark.png",
                                                  encode(dark, "PNG"))])
    result = run(tmp_path, vparams(pixel_mean=(10.0, 245.0)))
    assert_failed(result, tmp_path, "expect mean pixel value in 10..245: 1 of 49 rows failed",
                  "files/test/cat/dark.png (pixel_mean")


def test_label_errors_fail(tmp_path: Path) -> None:
    records = files_dataset(tmp_path / "raw")
    records.loc[0, "class_id"] = 7  # out of range
    records.loc[1, "class_name"] = "dog"  # name of another id
    records.loc[2, "class_name"] = "axolotl"  # not a class at all
    records.loc[3, "id"] = records.loc[4, "id"]  # duplicate id
    rewrite_records(tmp_path / "raw", records)
    result = run(tmp_path)
    assert_failed(result, tmp_path,
                  "expect class ids in 0..2: 1 of 48 rows failed, "
                  "e.g. files/train/cat/0000.png (class_id 7)",
                  "expect class names from the dataset's classes: 1 of 48 rows failed, "
                  "e.g. files/train/cat/0002.png (class_name 'axolotl')",
                  "expect each class name to match its class id: 3 of 48 rows failed",
                  "files/train/cat/0001.png (label '0:dog')",
                  "expect unique ids: 2 of 48 rows failed")


def test_source_side_bounds(tmp_path: Path) -> None:
    files_dataset(tmp_path / "raw")
    result = run(tmp_path, vparams(source_side=(16, 64)))
    assert_failed(result, tmp_path, "expect source widths in 16..64 px: 48 of 48 rows failed",
                  "expect source heights in 16..64 px", "(width 10 px)")


def test_converted_shape_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files_dataset(tmp_path / "raw")
    real = manifest_mod.to_pixels

    def off_by_one(image: object, size: int, channels: int, resize: str = "crop") -> np.ndarray:
        return real(image, size + 1, channels, resize)

    monkeypatch.setattr(manifest_mod, "to_pixels", off_by_one)
    result = run(tmp_path)
    assert_failed(result, tmp_path, "expect converted height == 8: 48 of 48 rows failed",
                  "expect converted width == 8", "(out_height 9)")


def test_duplicates_within_a_split_only_warn(tmp_path: Path) -> None:
    source = tmp_path / "raw" / "files" / "train" / "dog" / "0001.png"
    files_dataset(tmp_path / "raw")
    copy = source.read_bytes()
    files_dataset(tmp_path / "raw", extras=[Extra("train", "dog", "copy.png", copy)])
    result = run(tmp_path)
    assert result.success, result.summary()
    assert result.metrics()["duplicate_images"] == 2 and result.metrics()["warnings"] == 1
    assert ("warning: expect no exact duplicate images within a split: 2 of 49 rows failed, "
            "e.g. files/train/dog/0001.png (same pixels as files/train/dog/copy.png)"
            in result.summary())


# ----------------------------------------------------------------- the manifest


def test_content_hash_ignores_the_file_format(tmp_path: Path) -> None:
    pixels = picture(np.random.default_rng(3), 10, 3, 1)
    files_dataset(tmp_path / "raw", Spec(per_class={"train": 1}), extras=[
        Extra("train", "cat", "a.png", encode(pixels, "PNG")),
        Extra("train", "cat", "b.bmp", encode(pixels, "BMP")),
        Extra("train", "cat", "c.tiff", encode(pixels, "TIFF")),
    ])
    manifest = manifest_mod.build_manifest(RawDataset.load(tmp_path / "raw"), IMAGES)
    hashes = manifest.set_index("id")["content_hash"]
    assert hashes["train/cat/a.png"] == hashes["train/cat/b.bmp"] == hashes["train/cat/c.tiff"]
    assert hashes.nunique() == 4  # one per class from the Spec, plus the three copies


@pytest.mark.parametrize("kind", ["files", "packed"])
def test_missing_or_cut_bytes_are_undecodable(tmp_path: Path, kind: str) -> None:
    records = files_dataset(tmp_path / "raw", kind=kind)
    if kind == "files":
        (tmp_path / "raw" / records.loc[5, "location"]).unlink()
        expected = "file not found"
    else:  # a records.csv that points past the end of the blob
        blob = tmp_path / "raw" / "images.bin"
        blob.write_bytes(blob.read_bytes()[:-10])
        expected = "past the end of images.bin"
        records.loc[5] = records.iloc[-1]
        rewrite_records(tmp_path / "raw", records)
    manifest = manifest_mod.build_manifest(RawDataset.load(tmp_path / "raw"), IMAGES)
    row = manifest.loc[5]
    assert not row["decodable"] and row["error"].startswith(expected)
    assert pd.isna(row["pixel_mean"]) and pd.isna(row["width"]) and pd.isna(row["content_hash"])


@pytest.mark.parametrize("options", [
    {"quality": 75},  # 4:2:0
    {"quality": 95, "subsampling": 0},  # 4:4:4
    {"quality": 80, "progressive": True},
    {"quality": 60, "optimize": True, "subsampling": 1},
], ids=["420", "444", "progressive", "422-optimized"])
@pytest.mark.parametrize("shape", [(32, 32, 3), (17, 45, 3), (23, 9, 1)], ids=str)
@pytest.mark.parametrize("kind", ["files", "packed"])
def test_jpeg_fast_path_gives_pil_pixels(tmp_path: Path, options: dict[str, object],
                                         shape: tuple[int, int, int], kind: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(sum(shape))
    pixels = np.clip(np.linspace(0, 255, shape[1])[None, :, None]
                     + rng.integers(-60, 61, shape), 0, 255).astype(np.uint8)
    data = encode(pixels, "JPEG", **options)
    records = files_dataset(tmp_path / "raw", Spec(per_class={}), kind=kind,
                            extras=[Extra("train", "cat", "a.jpg", data)])
    raw = RawDataset.load(tmp_path / "raw")
    location = records.loc[0, "location"]
    slow = raw.decode(location)

    def not_this_way(self: RawDataset, location: str) -> None:
        raise AssertionError("took PIL's slow path")

    monkeypatch.setattr(RawDataset, "decode", not_this_way)
    fast = manifest_mod.decode(raw, location)
    assert (fast.width, fast.height, fast.mode, fast.nbytes) == (
        slow.width, slow.height, slow.mode, slow.nbytes)
    assert np.array_equal(np.asarray(fast.image), np.asarray(slow.image))
    assert manifest_mod.jpeg_header(data) == (shape[1], shape[0], shape[2])


def test_jpeg_fast_path_falls_back_for_cmyk(tmp_path: Path) -> None:
    from PIL import Image

    image = Image.fromarray(picture(np.random.default_rng(2), 12, 3, 0)).convert("CMYK")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    files_dataset(tmp_path / "raw", Spec(per_class={}), extras=[
        Extra("train", "cat", "cmyk.jpg", buffer.getvalue())])
    raw = RawDataset.load(tmp_path / "raw")
    assert manifest_mod.decode(raw, "files/train/cat/cmyk.jpg").mode == "CMYK"


def test_pool_gives_the_same_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files_dataset(tmp_path / "raw", extras=jpeg_pair())
    raw = RawDataset.load(tmp_path / "raw")
    alone = manifest_mod.build_manifest(raw, IMAGES, workers=1, pixels_out=tmp_path / "a.npy")
    monkeypatch.setattr(manifest_mod, "POOL_MIN_RECORDS", 1)
    monkeypatch.setattr(manifest_mod, "_MAX_CHUNK", 7)  # several chunks per worker
    pooled = manifest_mod.build_manifest(raw, IMAGES, workers=2, pixels_out=tmp_path / "b.npy")
    pd.testing.assert_frame_equal(alone, pooled)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    pixels = np.load(tmp_path / "a.npy")
    assert not pixels[~alone["decodable"].to_numpy()].any()  # undecodable rows: zeros
    fits = alone["decodable"].to_numpy()
    assert manifest_mod.hash_rows(pixels[fits]) == alone.loc[fits, "content_hash"].tolist()


@pytest.mark.parametrize("kind", ["files", "packed"])
def test_batched_jpeg_decoding_matches_one_by_one(tmp_path: Path, kind: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of plain JPEGs of exactly the configured size skip PIL's per-image path.

    Mixed in: a grayscale JPEG (converted to RGB), a progressive one, one of
    another size (resized), a truncated one and a PNG, which take the
    one-by-one path or fail there with PIL's message. Forcing every image
    through ``RawDataset.decode`` (no JPEG header known) must give the same
    manifest and the same pixels, in one process and on a pool.
    """
    size = 10
    gray = encode(picture(np.random.default_rng(5), size, 1, 2), "JPEG", quality=80)
    cut = encode(picture(np.random.default_rng(6), size, 3, 1), "JPEG", quality=90)[:-12]
    files_dataset(tmp_path / "raw", Spec(per_class={"train": 6, "test": 2}, fmt="JPEG"),
                  kind=kind, extras=[
                      Extra("train", "cat", "gray.jpg", gray),
                      Extra("train", "dog", "progressive.jpg", encode(
                          picture(np.random.default_rng(7), size, 3, 1), "JPEG",
                          progressive=True)),
                      Extra("train", "dog", "wide.jpg", encode(
                          picture(np.random.default_rng(8), 14, 3, 1)[:size], "JPEG")),
                      Extra("test", "frog", "cut.jpg", cut),
                      Extra("test", "frog", "lossless.png", encode(
                          picture(np.random.default_rng(9), size, 3, 2), "PNG")),
                  ])
    raw = RawDataset.load(tmp_path / "raw")
    images = ImageParams(side=size, channels=3)
    monkeypatch.setattr(manifest_mod, "POOL_MIN_RECORDS", 1)
    monkeypatch.setattr(manifest_mod, "_MAX_CHUNK", 5)
    one_by_one: list[str] = []
    convert = manifest_mod.convert

    def counted(raw: RawDataset, location: str, images: ImageParams) -> object:
        one_by_one.append(location)
        return convert(raw, location, images)

    monkeypatch.setattr(manifest_mod, "convert", counted)
    fast = manifest_mod.build_manifest(raw, images, workers=1, pixels_out=tmp_path / "a.npy")
    assert len(one_by_one) == 4  # gray, wide, cut and the PNG; not the 24 plain JPEGs
    pooled = manifest_mod.build_manifest(raw, images, workers=2, pixels_out=tmp_path / "b.npy")
    monkeypatch.setattr(manifest_mod, "jpeg_header", lambda data: None)  # PIL's own path
    slow = manifest_mod.build_manifest(raw, images, workers=1, pixels_out=tmp_path / "c.npy")
    pd.testing.assert_frame_equal(fast, slow)
    pd.testing.assert_frame_equal(pooled, slow)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "c.npy").read_bytes()
    assert (tmp_path / "b.npy").read_bytes() == (tmp_path / "c.npy").read_bytes()
    by_name = fast.set_index("id")
    assert by_name.at["test/frog/cut.jpg", "error"].startswith("image file is truncated")
    assert by_name.at["train/cat/gray.jpg", "mode"] == "L"
    assert by_name.at["train/dog/wide.jpg", "width"] == 14
    assert fast["decodable"].sum() == len(fast) - 1


def test_empty_dataset_fails_on_row_counts(tmp_path: Path) -> None:
    files_dataset(tmp_path / "raw", Spec(per_class={}))
    result = run(tmp_path)
    assert_failed(result, tmp_path, "e.g. train has 0 rows", "e.g. test has 0 rows",
                  "expect every class to be at least 10.0% of its split: 6 of 6 classes")


def test_jpeg_header_reads_only_plain_frames() -> None:
    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    frame = bytes([8]) + (20).to_bytes(2, "big") + (30).to_bytes(2, "big") + bytes([3]) + bytes(9)
    huffman_first = b"\xff\xd8" + segment(0xE0, b"JFIF\0") + segment(0xC4, bytes(20))
    assert manifest_mod.jpeg_header(huffman_first + segment(0xC0, frame)) == (30, 20, 3)
    assert manifest_mod.jpeg_header(huffman_first + segment(0xC2, frame)) == (30, 20, 3)
    assert manifest_mod.jpeg_header(huffman_first + segment(0xC3, frame)) is None  # lossless
    assert manifest_mod.jpeg_header(huffman_first + segment(0xC9, frame)) is None  # arithmetic
    twelve_bit = bytes([12]) + frame[1:]
    assert manifest_mod.jpeg_header(huffman_first + segment(0xC0, twelve_bit)) is None
    assert manifest_mod.jpeg_header(huffman_first + segment(0xDA, frame)) is None  # scan first
    assert manifest_mod.jpeg_header(b"\x89PNG\r\n\x1a\n" + bytes(40)) is None
