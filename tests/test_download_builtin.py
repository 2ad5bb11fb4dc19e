"""The builtin source: scikit-learn's digits, split with a seeded stratified split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from refinery.formats.raw import RawDataset
from refinery.params import DownloadParams
from refinery.stages.download import download


def run(tmp_path: Path, seed: int, name: str = "raw", **params: object) -> RawDataset:
    result = download(DownloadParams(**params), out_dir=tmp_path / name,  # type: ignore[arg-type]
                      cache_dir=tmp_path / "downloads", seed=seed)
    assert result.source == "builtin:digits" and len(result.sha256) == 64
    assert result.metrics()["network_bytes"] == 0
    return RawDataset.load(tmp_path / name)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.images, data.target


def test_digits_layout_counts_and_pixels(tmp_path: Path, digits: tuple) -> None:
    images, target = digits
    ds = run(tmp_path, seed=0)
    assert ds.meta["kind"] == "arrays" and ds.classes == [str(i) for i in range(10)]
    assert ds.meta["test_split_origin"] == "seeded" and ds.meta["seed"] == 0
    assert len(ds.records) == 1797 and ds.records["id"].is_unique
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "arrays", "dataset.json", "records.csv"]
    for split in ("train", "test"):
        array = ds.array(f"arrays/{split}.npy")
        rows = ds.records[ds.records.split == split]
        assert array.dtype == np.uint8 and array.shape == (len(rows), 8, 8, 1)
        assert ds.meta["counts"][split] == len(rows)
        for _, row in rows.iloc[:: max(1, len(rows) // 25)].iterrows():
            source = int(row.id.split(":")[1])
            expected = np.rint(images[source] * 255 / 16).astype(np.uint8)
            pixels = array[int(row.location.split("#")[1])][..., 0]
            assert np.array_equal(pixels, expected) and row.class_id == target[source]
    assert int(ds.array("arrays/train.npy").max()) == 255


def test_digits_split_is_stratified(tmp_path: Path, digits: tuple) -> None:
    _, target = digits
    ds = run(tmp_path, seed=3, test_fraction=0.25)
    test = ds.records[ds.records.split == "test"]
    for label in range(10):
        total = int((target == label).sum())
        assert abs(int((test.class_id == label).sum()) - total * 0.25) <= 0.5 + 1e-9


def test_digits_split_is_deterministic_per_seed(tmp_path: Path) -> None:
    a, b, c = run(tmp_path, 7, "a"), run(tmp_path, 7, "b"), run(tmp_path, 8, "c")
    assert a.records.equals(b.records)
    for split in ("train", "test"):
        assert np.array_equal(a.array(f"arrays/{split}.npy"), b.array(f"arrays/{split}.npy"))
    test_ids = {name: set(ds.records.id[ds.records.split == "test"])
                for name, ds in (("a", a), ("c", c))}
    assert test_ids["a"] != test_ids["c"]
    assert len(test_ids["a"]) == len(test_ids["c"])  # same per-class counts, other images
