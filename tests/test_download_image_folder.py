"""The image-folder source end to end: generated tar.gz/zip archives and a slice of the shared
CIFAR-10 JPEG archive, served over loopback HTTP or read from a path."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from loopback import LoopbackServer
from PIL import Image

from refinery.errors import DataLayoutError, UnsafeArchiveError
from refinery.formats.raw import RawDataset, UndecodableImage
from refinery.params import DownloadParams, ExtractLimits, HttpParams
from refinery.stages.download import download

FAST = HttpParams(timeout_s=5, retries=2, backoff_s=0.01)


def image(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    color = {"L": 120, "RGB": (200, 30, 40), "RGBA": (10, 200, 30, 128), "P": 5,
             "CMYK": (0, 50, 100, 20)}[mode]
    img = Image.new(mode, size, color)  # type: ignore[arg-type]
    img.putpixel((0, 0), {"L": 255, "RGB": (255, 255, 255), "RGBA": (255, 0, 0, 255), "P": 200,
                          "CMYK": (255, 0, 0, 0)}[mode])  # type: ignore[arg-type]
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def dataset_files(top: str = "mydata/", train: str = "train", test: str | None = "test"
                  ) -> dict[str, bytes]:
    """Archive path -> bytes: 3 classes, five image modes, sizes, a non-image, nesting, junk."""
    files = {
        f"{top}{train}/cat/a.png": image("L", (10, 12), "PNG"),
        f"{top}{train}/cat/b.jpg": image("RGB", (32, 32), "JPEG"),
        f"{top}{train}/cat/c.png": image("RGBA", (17, 9), "PNG"),
        f"{top}{train}/dog/p.gif": image("P", (20, 20), "GIF"),
        f"{top}{train}/dog/k.jpg": image("CMYK", (16, 24), "JPEG"),
        f"{top}{train}/dog/broken.jpg": image("RGB", (32, 32), "JPEG")[:50],  # validate's job
        f"{top}{train}/bird/x.png": image("RGB", (40, 30), "PNG"),
        f"{top}{train}/bird/sub/y.png": image("L", (8, 8), "PNG"),
        f"{top}.DS_Store": b"junk",
        f"{top}{train}/Thumbs.db": b"junk",
        f"{top}{train}/cat/.hidden.jpg": b"junk",
        f"__MACOSX/{top}{train}/cat/._a.png": b"junk",
    }
    if test:
        files.update({
            f"{top}{test}/cat/t1.png": image("RGB", (32, 32), "PNG"),
            f"{top}{test}/dog/t2.jpg": image("L", (32, 32), "JPEG"),
            f"{top}{test}/bird/t3.png": image("RGBA", (32, 32), "PNG"),
        })
    return files


def write_archive(path: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in dirs:
                zf.writestr(name.rstrip("/") + "/", b"")
            for name, data in files.items():
                zf.writestr(name, data)
        return path
    with tarfile.open(path, "w:gz") as tf:
        for name in dirs:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def run(tmp_path: Path, url: str, seed: int = 0, **kwargs: object):
    p = DownloadParams(source="image-folder", url=url, http=FAST, **kwargs)  # type: ignore[arg-type]
    return download(p, out_dir=tmp_path / "data" / "raw",
                    cache_dir=tmp_path / "data" / "downloads", seed=seed)


def assert_no_output(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    left = sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []
    assert set(left) <= {"downloads"}, f"left behind: {left}"


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_image_folder_end_to_end(loopback_server: LoopbackServer, tmp_path: Path,
                                 suffix: str) -> None:
    files = dataset_files()
    archive = write_archive(tmp_path / f"src{suffix}", files).read_bytes()
    url = loopback_server.serve(f"/images{suffix}", archive)
    checksum = "sha256:" + hashlib.sha256(archive).hexdigest()
    result = run(tmp_path, url, checksum=checksum)
    assert result.classes == ["bird", "cat", "dog"]
    assert result.counts == {"train": 8, "test": 3}
    assert result.metrics()["skipped_junk"] >= 3

    ds = RawDataset.load(tmp_path / "data" / "raw")
    assert ds.meta["kind"] == "packed" and ds.meta["classes"] == ["bird", "cat", "dog"]
    assert ds.meta["split_names"] == {"train": "train", "test": "test"}
    assert ds.meta["test_split_origin"] == "source" and ds.meta["dataset_root"] == "mydata"
    assert ds.meta["checksum"] == checksum and ds.meta["counts"] == result.counts
    assert sorted(p.name for p in ds.root.iterdir()) == ["dataset.json", "images.bin",
                                                         "records.csv"]
    expected = {name.removeprefix("mydata/"): data for name, data in files.items()
                if data != b"junk"}
    assert set(ds.records.id) == set(expected)
    blob_size = (ds.root / "images.bin").stat().st_size
    assert blob_size == sum(len(data) for data in expected.values())  # no junk copied
    modes = {}
    for row in ds.records.itertuples():
        assert re.fullmatch(r"images\.bin#\d+\+\d+", row.location)
        assert ds.read_bytes(row.location) == expected[row.id]  # untouched
        assert row.source_path == f"mydata/{row.id}"
        assert row.split == row.id.split("/")[0] and row.class_name == row.id.split("/")[1]
        assert row.class_id == ds.classes.index(row.class_name)
        if row.id.endswith("broken.jpg"):
            with pytest.raises(UndecodableImage, match=re.escape(row.location)):
                ds.decode(row.location)
        else:
            decoded = ds.decode(row.location)
            assert decoded.nbytes == len(expected[row.id])
            modes[row.id] = decoded.mode
    assert modes["train/cat/a.png"] == "L" and modes["train/dog/k.jpg"] == "CMYK"
    assert modes["train/dog/p.gif"] == "P" and modes["train/cat/c.png"] == "RGBA"


def test_plain_path_and_train_val_folders(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "src.zip", dataset_files(top="", test="val"))
    result = run(tmp_path, str(archive), test_split="val")
    assert result.counts == {"train": 8, "test": 3}
    ds = RawDataset.load(tmp_path / "data" / "raw")
    assert ds.meta["split_names"] == {"train": "train", "test": "val"}
    assert ds.meta["dataset_root"] == "." and ds.meta["url"] == str(archive)
    assert set(ds.records.split) == {"train", "test"}
    t1 = ds.records.set_index("id").loc["test/cat/t1.png"]
    assert t1.source_path == "val/cat/t1.png"
    assert ds.read_bytes(t1.location) == dataset_files(top="", test="val")["val/cat/t1.png"]
    assert not (tmp_path / "data" / "downloads").exists()  # a local file is never copied


def test_files_outside_the_splits_are_left_out_of_the_blob(tmp_path: Path) -> None:
    files = {**dataset_files(), "mydata/README.txt": b"about", "mydata/extra/z/1.png": b"z" * 99}
    archive = write_archive(tmp_path / "src.tar.gz", files)
    result = run(tmp_path, str(archive))
    assert result.counts == {"train": 8, "test": 3}
    ds = RawDataset.load(tmp_path / "data" / "raw")
    kept = [ds.read_bytes(row.location) for row in ds.records.itertuples()]
    assert kept == [files[path] for path in ds.records.source_path]
    assert (ds.root / "images.bin").read_bytes() == b"".join(kept)  # compacted, record order


def many_per_class(top: str, n: int = 10) -> dict[str, bytes]:
    return {f"{top}{cls}/{i:02d}.png": image("L", (8, 8), "PNG")
            for cls in ("a", "b", "c") for i in range(n)}


@pytest.mark.parametrize("top", ["data/train/", "flat/", ""])
def test_single_split_is_divided_with_a_seeded_stratified_split(tmp_path: Path,
                                                                top: str) -> None:
    files = many_per_class(top)
    archive = write_archive(tmp_path / "src.tgz", files).as_uri()
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run(tmp_path, archive, seed=seed, test_split=None, test_fraction=0.2)
        ds = RawDataset.load(tmp_path / "data" / "raw")
        runs[name] = ds.records
        assert ds.meta["test_split_origin"] == "seeded" and ds.meta["seed"] == seed
        test = ds.records[ds.records.split == "test"]
        assert Counter(test.class_name) == {"a": 2, "b": 2, "c": 2}
        assert set(ds.records.source_path) == set(files)
        for row in ds.records.itertuples():
            assert row.id == f"{row.split}/{row.source_path.removeprefix(top)}"
            assert ds.read_bytes(row.location) == files[row.source_path]
    assert runs["a"].equals(runs["b"])
    assert not runs["a"].equals(runs["c"])


@pytest.mark.parametrize(("files", "dirs", "kwargs", "message"), [
    (dataset_files(), ("mydata/train/fish/",), {},
     r"mydata/train/fish/: class folder has no files"),
    (dataset_files(), (), {"test_split": "val"},
     r"mydata/: no split folder 'val' \(found folders: \['test', 'train'\]\)"),
    ({**dataset_files(), "mydata/test/fox/1.png": b"x"}, (), {},
     r"mydata/test/: classes \['fox'\] are not in the train split folder 'train'"),
    ({**dataset_files(), "mydata/train/loose.jpg": b"x"}, (), {},
     r"mydata/train/: 1 file\(s\) directly in the split folder \(e.g. \['loose.jpg'\]\)"),
    ({"d/train/.DS_Store": b"x", "d/test/x": b""}, ("d/train/",), {},
     r"d/train/: no class folders"),
])
def test_layout_errors_name_the_folder(tmp_path: Path, files: dict[str, bytes],
                                       dirs: tuple[str, ...], kwargs: dict, message: str) -> None:
    for suffix in (".tar.gz", ".zip"):
        archive = write_archive(tmp_path / f"bad{suffix}", files, dirs)
        with pytest.raises(DataLayoutError, match=message):
            run(tmp_path, str(archive), **kwargs)
        assert_no_output(tmp_path)


def test_failure_keeps_the_previous_raw_data(tmp_path: Path) -> None:
    download(DownloadParams(), out_dir=tmp_path / "data" / "raw",
             cache_dir=tmp_path / "data" / "downloads",
             seed=0)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("train/cat/a.png", b"x")
        zf.writestr("../../evil.png", b"x")
    with pytest.raises(UnsafeArchiveError, match=re.escape("'../../evil.png'")):
        run(tmp_path, str(bad))
    assert RawDataset.load(tmp_path / "data" / "raw").meta["source"] == "builtin"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]
    assert not (tmp_path.parent / "evil.png").exists()


def test_bomb_limits_apply_through_the_stage(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "big.tgz", {"train/a/x.bin": bytes(2 << 20),
                                                   "test/a/y.bin": b"1"})
    with pytest.raises(UnsafeArchiveError, match="max_bytes"):
        run(tmp_path, str(archive), limits=ExtractLimits(max_bytes=1 << 20))
    assert_no_output(tmp_path)


# --------------------------------------------------------- shared CIFAR-10 JPEG slice


@pytest.fixture
def cifar_slice(tmp_path: Path, shared_cifar: Path) -> tuple[Path, dict[str, bytes]]:
    """20 images per class and split of the shared archive, repacked as a small tar.gz."""
    picked: dict[str, bytes] = {}
    per: Counter[tuple[str, str]] = Counter()
    out = tmp_path / "cifar10-slice.tar.gz"
    with tarfile.open(shared_cifar, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or per[parts[1], parts[2]] >= 20:
                continue
            per[parts[1], parts[2]] += 1
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            picked[member.name] = data
            dst.addfile(member, io.BytesIO(data))
            if len(per) == 20 and all(v >= 20 for v in per.values()):
                break
    return out, picked


def test_shared_cifar_slice_over_http(loopback_server: LoopbackServer, tmp_path: Path,
                                      cifar_slice: tuple[Path, dict[str, bytes]]) -> None:
    archive, picked = cifar_slice
    data = archive.read_bytes()
    url = loopback_server.serve("/cifar10-jpeg.tar.gz", data, drop_after=len(data) // 3)
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    result = run(tmp_path, url, checksum=checksum)
    assert loopback_server.ranges_requested("/cifar10-jpeg.tar.gz")  # resumed after the cut
    assert result.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                              "horse", "ship", "truck"]
    assert result.counts == {"train": 200, "test": 200}
    ds = RawDataset.load(tmp_path / "data" / "raw")
    assert ds.meta["dataset_root"] == "cifar10-jpeg"
    assert set(ds.records.id) == {name.removeprefix("cifar10-jpeg/") for name in picked}
    assert all(count == 20 for count in ds.meta["class_counts"]["test"].values())
    for row in ds.records.iloc[::37].itertuples():
        assert ds.read_bytes(row.location) == picked[f"cifar10-jpeg/{row.id}"]
        decoded = ds.decode(row.location)
        assert (decoded.width, decoded.height, decoded.mode) == (32, 32, "RGB")
    download(DownloadParams(source="image-folder", url=url, checksum=checksum),
             out_dir=tmp_path / "data" / "raw", cache_dir=tmp_path / "data" / "downloads", seed=0)
    assert loopback_server.count() == 2  # the re-run reused the verified cache
