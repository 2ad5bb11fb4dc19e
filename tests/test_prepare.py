"""The prepare stage: stratified splits, the labeled subset, train-only statistics,
byte-identical outputs for a seed, the pixels handed over by validate (and the
same output when decoding instead), and refusal of a manifest or pixels file
that no longer matches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rawdata import Extra, Spec, encode, files_dataset, picture

from refinery.errors import DataValidationFailed
from refinery.formats import manifest as manifest_mod
from refinery.formats.prepared import SPLIT_FILES, load_prepared
from refinery.formats.raw import RawDataset, to_pixels
from refinery.params import ImageParams, PrepareParams
from refinery.splits import labeled_subset, stratified_holdout
from refinery.stages.prepare import channel_stats, prepare

IMAGES = ImageParams(side=8, channels=3)
SPEC = Spec(per_class={"train": 20, "test": 4})
OUTPUTS = (*(f"{name}.pt" for name in SPLIT_FILES), "labeled.pt", "meta.json")


def write_manifest(root: Path, images: ImageParams = IMAGES, drop_undecodable: bool = False,
                   ) -> Path:
    """What a passing ``validate`` leaves (its GX checks are tested in test_validate.py):
    the manifest, with its info, and ``pixels.npy``."""
    raw = RawDataset.load(root / "raw")
    scratch = root / "all-pixels.npy"
    manifest = manifest_mod.build_manifest(raw, images, pixels_out=scratch)
    keep = manifest["decodable"].to_numpy()
    if drop_undecodable:
        manifest = manifest[manifest["decodable"]].reset_index(drop=True)
    assert manifest["decodable"].all()
    manifest_mod.copy_rows(scratch, root / "pixels.npy", keep)
    scratch.unlink()
    path = root / "manifest.parquet"
    manifest_mod.write_manifest(path=path, manifest=manifest,
                                info=manifest_mod.build_info(raw, manifest, images))
    return path


def run(root: Path, out: str = "prepared", seed: int = 0, images: ImageParams = IMAGES,
        **changes: float) -> Path:
    p = PrepareParams(**{"val_fraction": 0.25, "label_fraction": 0.2, **changes})
    prepare(p, images=images, seed=seed, raw_dir=root / "raw",
            manifest_path=root / "manifest.parquet",
            out_dir=root / out)
    return root / out


def same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("prepare decoded the images although validate's pixels were there")

    monkeypatch.setattr(manifest_mod, "map_chunks", refuse)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    files_dataset(tmp_path / "raw", SPEC)
    write_manifest(tmp_path)
    return tmp_path


def per_class(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=3).tolist()


def test_splits_are_stratified_and_complete(dataset: Path) -> None:
    data = load_prepared(run(dataset))
    assert per_class(data.train.labels) == [15, 15, 15]
    assert per_class(data.val.labels) == [5, 5, 5]
    assert per_class(data.test.labels) == [4, 4, 4]
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    ids = data.train.ids + data.val.ids + data.test.ids
    assert sorted(ids) == sorted(manifest["id"]) and len(set(ids)) == len(ids)
    assert all(i.startswith("train/") for i in data.train.ids + data.val.ids)
    assert all(i.startswith("test/") for i in data.test.ids)
    assert data.train.images.dtype == torch.uint8
    assert tuple(data.train.images.shape) == (45, 3, 8, 8)
    assert data.classes == ["cat", "dog", "frog"] and data.size == 8 and data.channels == 3
    assert data.meta["counts"] == {"train": 45, "val": 15, "test": 12}
    assert data.meta["seed"] == 0 and data.meta["val_fraction"] == 0.25


def test_images_and_labels_match_the_source_files(dataset: Path) -> None:
    from PIL import Image

    data = load_prepared(run(dataset))
    for split in (data.train, data.val, data.test):
        for row in (0, len(split) - 1):
            image_id = split.ids[row]
            with Image.open(dataset / "raw" / "files" / image_id) as source:
                expected = to_pixels(source, 8, 3)
            assert np.array_equal(split.images[row].permute(1, 2, 0).numpy(), expected)
            assert data.classes[int(split.labels[row])] == image_id.split("/")[1]


def test_packed_dataset(tmp_path: Path) -> None:
    records = files_dataset(tmp_path / "raw", Spec(per_class={"train": 8, "test": 2},
                                                   fmt="JPEG"), kind="packed")
    write_manifest(tmp_path)
    data = load_prepared(run(tmp_path))
    raw = RawDataset.load(tmp_path / "raw")
    where = records.set_index("id")["location"]
    for split in (data.train, data.val, data.test):
        image_id = split.ids[0]
        expected = to_pixels(raw.decode(where[image_id]).image, 8, 3)
        assert np.array_equal(split.images[0].permute(1, 2, 0).numpy(), expected)
    assert data.meta["counts"] == {"train": 18, "val": 6, "test": 6}


def test_labeled_subset_is_per_class_and_in_train(dataset: Path) -> None:
    data = load_prepared(run(dataset))
    assert data.labeled.dtype == torch.int64
    assert per_class(data.train.labels[data.labeled]) == [3, 3, 3]  # round(15 * 0.2)
    assert torch.equal(data.labeled, torch.sort(data.labeled).values)
    assert len(data.unlabeled) == 45 - 9 and data.meta["labeled"] == 9


def test_tiny_label_fraction_keeps_one_per_class(dataset: Path) -> None:
    data = load_prepared(run(dataset, label_fraction=0.001))
    assert per_class(data.train.labels[data.labeled]) == [1, 1, 1]


def test_normalisation_comes_from_train_only(dataset: Path) -> None:
    data = load_prepared(run(dataset))
    train = data.train.images.double() / 255.0
    assert data.mean == pytest.approx(train.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert data.std == pytest.approx(train.std(dim=(0, 2, 3), correction=0).tolist(),
                                     abs=1e-12)
    everything = torch.cat([data.train.images, data.val.images, data.test.images]).double()
    assert data.mean != pytest.approx((everything / 255.0).mean(dim=(0, 2, 3)).tolist(),
                                      abs=1e-6)


def test_same_seed_same_bytes_other_seed_other_split(dataset: Path) -> None:
    first = run(dataset, "a")
    second = run(dataset, "b")
    same_outputs(first, second)
    other = load_prepared(run(dataset, "c", seed=1))
    assert set(other.val.ids) != set(load_prepared(first).val.ids)


def test_validated_pixels_are_packed_without_decoding(dataset: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    no_decoding(monkeypatch)
    result = prepare(PrepareParams(val_fraction=0.25, label_fraction=0.2), images=IMAGES, seed=0,
                     raw_dir=dataset / "raw", manifest_path=dataset / "manifest.parquet",
                     out_dir=dataset / "prepared")
    assert not result.decoded and result.metrics()["decoded_images"] == 0
    assert result.timings["pixels_seconds"] > 0


def test_decoding_again_gives_the_same_bytes(dataset: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without validate's pixels file, prepare decodes (here on a pool): the same outputs."""
    handed_over = run(dataset, "a")
    (dataset / "pixels.npy").unlink()
    monkeypatch.setattr(manifest_mod, "POOL_MIN_RECORDS", 1)
    monkeypatch.setattr(manifest_mod, "_MAX_CHUNK", 5)
    result = prepare(PrepareParams(val_fraction=0.25, label_fraction=0.2), images=IMAGES, seed=0,
                     raw_dir=dataset / "raw", manifest_path=dataset / "manifest.parquet",
                     out_dir=dataset / "b", workers=2)
    assert result.decoded and result.metrics()["decoded_images"] == 72
    assert result.counts == {"train": 45, "val": 15, "test": 12}
    same_outputs(handed_over, dataset / "b")


def test_manifest_without_info_is_decoded_again(dataset: Path) -> None:
    """A manifest written before the pixels handover (plain parquet): prepare decodes."""
    handed_over = run(dataset, "a")
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    manifest.to_parquet(dataset / "manifest.parquet", index=False)
    assert manifest_mod.read_manifest(dataset / "manifest.parquet")[1] is None
    same_outputs(handed_over, run(dataset, "b"))


def test_validate_then_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages as the pipeline runs them: validate's files are prepare's input.

    Packed JPEGs of the configured size, like CIFAR-10: validate's batched decoding.
    """
    from refinery.params import ValidateParams
    from refinery.stages.validate import validate

    files_dataset(tmp_path / "raw", Spec(per_class={"train": 20, "test": 4}, size=8, fmt="JPEG"),
                  kind="packed")
    checked = validate(ValidateParams(rows={"train": (30, 100), "test": (10, 50)},
                                      min_class_fraction=0.1),
                       images=IMAGES, raw_dir=tmp_path / "raw",
                       manifest_path=tmp_path / "manifest.parquet",
                       reports_dir=tmp_path / "reports")
    assert checked.success, checked.summary()
    with monkeypatch.context() as patched:
        no_decoding(patched)
        handed_over = run(tmp_path, "a")
    (tmp_path / "pixels.npy").unlink()
    same_outputs(handed_over, run(tmp_path, "b"))  # decoded from scratch


def test_pixels_that_differ_from_the_manifest_are_refused(dataset: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    out = run(dataset)
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    pixels = np.load(dataset / "pixels.npy", mmap_mode="r+")
    pixels[7, 0, 0, 0] ^= 1  # one bit of one image
    pixels.flush()
    del pixels
    no_decoding(monkeypatch)
    with pytest.raises(DataValidationFailed,
                       match=r"1 of 72 rows of .*pixels.npy differ from the validated pixels "
                             r"\(content_hash\), e.g. files/train/cat/0007.png: run the validate"):
        run(dataset)
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before


@pytest.mark.parametrize("change", ["rows", "dtype", "garbage"])
def test_pixels_file_of_another_shape_is_refused(dataset: Path, change: str) -> None:
    path = dataset / "pixels.npy"
    pixels = np.load(path)
    if change == "rows":
        np.save(path, pixels[:-1])
    elif change == "dtype":
        np.save(path, pixels.astype(np.int16))
    else:
        path.write_bytes(b"not an array")
    with pytest.raises(DataValidationFailed, match="run the validate stage again"):
        run(dataset)
    assert not (dataset / "prepared").exists()


def test_other_resize_than_validated_is_refused(dataset: Path) -> None:
    """Same shape, other conversion: only the manifest's info can tell."""
    with pytest.raises(DataValidationFailed, match=r"'resize': 'crop'.*'resize': 'stretch'"):
        run(dataset, images=ImageParams(side=8, channels=3, resize="stretch"))


def test_result_metrics(dataset: Path) -> None:
    p = PrepareParams(val_fraction=0.25, label_fraction=0.2)
    result = prepare(p, images=IMAGES, seed=0, raw_dir=dataset / "raw",
                     manifest_path=dataset / "manifest.parquet", out_dir=dataset / "out")
    metrics = result.metrics()
    assert metrics["train_images"] == 45 and metrics["val_images"] == 15
    assert metrics["test_images"] == 12 and metrics["labeled_images"] == 9
    assert metrics["unlabeled_images"] == 36 and metrics["classes"] == 3
    assert metrics["seconds"] > 0


def test_only_manifest_rows_are_used(tmp_path: Path) -> None:
    bad = Extra("train", "cat", "broken.jpg", b"not an image")
    files_dataset(tmp_path / "raw", SPEC, extras=[bad])
    write_manifest(tmp_path, drop_undecodable=True)
    data = load_prepared(run(tmp_path))
    assert "train/cat/broken.jpg" not in data.train.ids + data.val.ids
    assert data.meta["counts"]["train"] + data.meta["counts"]["val"] == 60


def test_changed_image_since_validation_is_refused(dataset: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The raw files' fingerprint changed: prepare decodes again and names what changed."""
    target = dataset / "raw" / "files" / "train" / "dog" / "0002.png"
    target.write_bytes(encode(picture(np.random.default_rng(42), 10, 3, 1), "PNG"))
    with pytest.raises(DataValidationFailed, match=r"train/dog/0002.png \(pixels differ"):
        run(dataset)
    assert not (dataset / "prepared").exists()
    assert any("raw data changed since validation" in r.getMessage() for r in caplog.records)


def test_same_pixels_in_other_raw_bytes_are_accepted(dataset: Path) -> None:
    """A raw file re-encoded with the same pixels: decoded again, and nothing changed."""
    from PIL import Image

    first = run(dataset, "a")
    target = dataset / "raw" / "files" / "train" / "dog" / "0002.png"
    with Image.open(target) as image:
        image.load()
        image.save(target, format="PNG", compress_level=1)  # other bytes, same pixels
    result = prepare(PrepareParams(val_fraction=0.25, label_fraction=0.2), images=IMAGES, seed=0,
                     raw_dir=dataset / "raw", manifest_path=dataset / "manifest.parquet",
                     out_dir=dataset / "b")
    assert result.decoded
    same_outputs(first, dataset / "b")


def test_other_image_params_than_validated_are_refused(dataset: Path) -> None:
    with pytest.raises(DataValidationFailed, match="run the validate stage again"):
        run(dataset, images=ImageParams(side=16, channels=3))


def test_failed_prepare_keeps_the_previous_output(dataset: Path) -> None:
    out = run(dataset)
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    (dataset / "raw" / "files" / "test" / "cat" / "0001.png").unlink()
    with pytest.raises(DataValidationFailed, match="file not found"):
        run(dataset)
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before


# ------------------------------------------------------------------ the helpers


def test_stratified_holdout_small_classes() -> None:
    labels = np.array([0] * 10 + [1] * 2 + [2])
    held = stratified_holdout(labels, 0.25, np.random.default_rng(0))
    assert held[labels == 0].sum() == 3  # round(2.5) up, not to even
    assert held[labels == 1].sum() == 1  # at least one each side
    assert held[labels == 2].sum() == 0  # a singleton stays in train


def test_labeled_subset_caps_at_class_size() -> None:
    labels = np.array([0] * 4 + [1])
    picked = labeled_subset(labels, 1.0, np.random.default_rng(0))
    assert picked.tolist() == [0, 1, 2, 3, 4]


def test_channel_stats_are_exact() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    mean, std = channel_stats(pixels)
    values = pixels.astype(np.float64) / 255.0
    assert mean == pytest.approx(values.mean(axis=(0, 1, 2)).tolist(), abs=1e-12)
    assert std == pytest.approx(values.std(axis=(0, 1, 2)).tolist(), abs=1e-12)


# ------------------------------------------------------------- the real data set


@pytest.mark.slow
def test_shared_cifar10_validates_and_prepares(tmp_path: Path, shared_cifar: Path) -> None:
    """The whole CIFAR-10 JPEG archive through download -> validate -> prepare (~1 min)."""
    from refinery.params import DownloadParams, ValidateParams
    from refinery.stages.download import download
    from refinery.stages.validate import validate

    download(DownloadParams(source="image-folder", url=str(shared_cifar)),
             out_dir=tmp_path / "raw", cache_dir=tmp_path / "downloads", seed=0)
    images = ImageParams(side=32, channels=3)
    checked = validate(ValidateParams(rows={"train": (45000, 55000), "test": (9000, 11000)},
                                      min_class_fraction=0.08),
                       images=images, raw_dir=tmp_path / "raw",
                       manifest_path=tmp_path / "manifest.parquet",
                       reports_dir=tmp_path / "reports")
    assert checked.success, checked.summary()
    metrics = checked.metrics()
    assert (metrics["rows_train"], metrics["rows_test"]) == (50000, 10000)
    assert metrics["undecodable"] == metrics["leaked_test_images"] == 0
    data = load_prepared(run(tmp_path, images=images, val_fraction=0.1, label_fraction=0.1))
    assert data.meta["counts"] == {"train": 45000, "val": 5000, "test": 10000}
    assert torch.bincount(data.train.labels[data.labeled]).tolist() == [450] * 10
    assert data.mean == pytest.approx([0.4914, 0.4822, 0.4465], abs=0.005)  # the known values
