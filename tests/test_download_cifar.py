"""The cifar10-binary source end to end: a generated archive in the official byte layout,
served by a real loopback HTTP server, parsed (never unpickled) into uint8 arrays."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from loopback import LoopbackServer

from refinery.errors import ChecksumMismatch, DataLayoutError
from refinery.formats.raw import RawDataset
from refinery.params import DownloadParams, HttpParams
from refinery.stages.download import download

NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def cifar_archive(per_file: int = 3, meta: bool = True, corrupt: str | None = None,
                  drop: str | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """A ``cifar-10-binary.tar.gz`` look-alike; returns its bytes and the (N,32,32,3) images."""
    rng = np.random.default_rng(0)
    buffer, images = io.BytesIO(), {}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for name in FILES:
            if name == drop:
                continue
            pixels = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, per_file, dtype=np.uint8)
            planes = pixels.transpose(0, 3, 1, 2).reshape(per_file, 3072)  # R, G, B planes
            data = np.concatenate([labels[:, None], planes], axis=1).tobytes()
            add(name, data[:-7] if name == corrupt else data)
            images[name] = (pixels, labels)
        if meta:
            add("batches.meta.txt", ("\n".join(NAMES) + "\n\n").encode())
        add("readme.html", b"<html></html>")
    return buffer.getvalue(), images


def params(url: str, checksum: str | None) -> DownloadParams:
    return DownloadParams(source="cifar10-binary", url=url, checksum=checksum,
                          http=HttpParams(timeout_s=5, retries=2, backoff_s=0.01))


def test_cifar_binary_end_to_end(loopback_server: LoopbackServer, tmp_path: Path) -> None:
    data, written = cifar_archive()
    url = loopback_server.serve("/cifar-10-binary.tar.gz", data)
    md5 = "md5:" + hashlib.md5(data).hexdigest()
    result = download(params(url, md5), out_dir=tmp_path / "raw",
                      cache_dir=tmp_path / "downloads", seed=0)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.counts == {"train": 15, "test": 3} and result.classes == NAMES
    assert result.metrics()["network_bytes"] == len(data)

    ds = RawDataset.load(tmp_path / "raw")
    assert sorted(p.name for p in ds.root.iterdir()) == ["arrays", "dataset.json", "records.csv"]
    assert ds.meta["kind"] == "arrays" and ds.meta["checksum"] == md5
    assert ds.meta["sha256"] == result.sha256 and ds.meta["url"] == url
    assert ds.meta["test_split_origin"] == "source"
    assert ds.records["id"].is_unique
    for split, names in (("train", FILES[:5]), ("test", FILES[5:])):
        pixels = np.concatenate([written[n][0] for n in names])
        labels = np.concatenate([written[n][1] for n in names])
        array = ds.array(f"arrays/{split}.npy")
        assert array.dtype == np.uint8 and array.shape == (len(labels), 32, 32, 3)
        assert np.array_equal(array, pixels)
        rows = ds.records[ds.records.split == split]
        assert list(rows.class_id) == list(labels)
        assert list(rows.class_name) == [NAMES[i] for i in labels]
        assert list(rows.location) == [f"arrays/{split}.npy#{i}" for i in range(len(labels))]
        assert list(rows.id) == [f"{split}:{i:06d}" for i in range(len(labels))]
        assert list(rows.source_path) == [f"cifar-10-batches-bin/{name}#{i}" for name in names
                                          for i in range(len(written[name][1]))]
    decoded = ds.decode("arrays/test.npy#2")
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded.image), pixels[2])


def test_rerun_with_pinned_checksum_makes_no_requests(loopback_server: LoopbackServer,
                                                      tmp_path: Path) -> None:
    data, _ = cifar_archive(per_file=1)
    url = loopback_server.serve("/c.tar.gz", data)
    pinned = params(url, "sha256:" + hashlib.sha256(data).hexdigest())
    download(pinned, out_dir=tmp_path / "raw", cache_dir=tmp_path / "downloads", seed=0)
    assert loopback_server.count() == 1
    again = download(pinned, out_dir=tmp_path / "raw", cache_dir=tmp_path / "downloads", seed=0)
    assert loopback_server.count() == 1
    assert again.metrics()["reused_cache"] == 1.0 and again.metrics()["network_bytes"] == 0
    assert again.counts == {"train": 5, "test": 1}


def test_default_class_names_without_meta(tmp_path: Path) -> None:
    data, _ = cifar_archive(per_file=1, meta=False)
    (tmp_path / "c.tgz").write_bytes(data)
    result = download(params(str(tmp_path / "c.tgz"), None), out_dir=tmp_path / "raw",
                      cache_dir=tmp_path / "downloads", seed=0)
    assert result.classes[0] == "airplane" and len(result.classes) == 10


def assert_no_output(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    left = sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []
    assert "raw" not in left and not [n for n in left if n.startswith(".")], left
    downloads = data_dir / "downloads"
    if downloads.exists():
        assert not [p for p in downloads.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"corrupt": "data_batch_3.bin"}, r"data_batch_3\.bin: \d+ bytes is not a whole number "
                                      r"of 3073-byte CIFAR-10 records"),
    ({"drop": "test_batch.bin"}, "no test_batch.bin"),
    ({"drop": "data_batch_5.bin"}, r"missing \['data_batch_5.bin'\]"),
])
def test_bad_cifar_archive_is_a_layout_error(loopback_server: LoopbackServer, tmp_path: Path,
                                             kwargs: dict, message: str) -> None:
    data, _ = cifar_archive(per_file=2, **kwargs)
    url = loopback_server.serve("/c.tar.gz", data)
    with pytest.raises(DataLayoutError, match=message):
        download(params(url, None), out_dir=tmp_path / "data" / "raw",
                 cache_dir=tmp_path / "data" / "downloads",
                 seed=0)
    assert_no_output(tmp_path)


def test_checksum_mismatch_leaves_no_output(loopback_server: LoopbackServer,
                                            tmp_path: Path) -> None:
    data, _ = cifar_archive(per_file=1)
    url = loopback_server.serve("/c.tar.gz", data)
    with pytest.raises(ChecksumMismatch, match=url):
        download(params(url, "md5:" + "f" * 32), out_dir=tmp_path / "data" / "raw",
                 cache_dir=tmp_path / "data" / "downloads", seed=0)
    assert_no_output(tmp_path)
    assert not (tmp_path / "data" / "downloads").exists()  # not even an empty folder
