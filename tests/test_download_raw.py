"""The raw layout's reading side: the three location forms, packed records read through a memory
map (also in pool workers), and ``files`` datasets written the old way still loading."""

from __future__ import annotations

import io
import multiprocessing as mp
import pickle
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from refinery.formats import raw
from refinery.formats.raw import Location, RawDataset, UndecodableImage, parse_location


def png(value: int, size: tuple[int, int] = (6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def packed(tmp_path: Path) -> tuple[RawDataset, list[bytes]]:
    """A hand-made packed dataset: three PNGs and a broken file back to back in images.bin."""
    images = [png(10), png(200, (3, 5)), b"not an image", png(90)]
    offsets = np.cumsum([0] + [len(data) for data in images])
    (tmp_path / "images.bin").write_bytes(b"".join(images))
    records = pd.DataFrame({
        "id": [f"train/c/{i}.png" for i in range(len(images))],
        "split": "train", "class_id": 0, "class_name": "c",
        "location": [raw.packed_location(int(offsets[i]), len(data))
                     for i, data in enumerate(images)],
        "source_path": [f"top/train/c/{i}.png" for i in range(len(images))],
    })
    raw.write_records(tmp_path, records)
    raw.write_meta(tmp_path, {"kind": "packed", "classes": ["c"]})
    return RawDataset.load(tmp_path), images


def test_location_forms_cannot_be_mistaken() -> None:
    assert parse_location("images.bin#12+34") == Location("packed", "images.bin", offset=12,
                                                          length=34)
    assert parse_location("arrays/train.npy#7") == Location("arrays", "arrays/train.npy", row=7)
    assert parse_location("files/train/cat/a.jpg") == Location("files", "files/train/cat/a.jpg")
    for bad in ("images.bin#12+", "images.bin#+3", "images.bin#1+2+3", "a.npy#-1", "#3",
                "a.npy# 3"):
        with pytest.raises(ValueError, match="not a raw record location"):
            parse_location(bad)


def test_packed_records_read_and_decode_like_files(packed: tuple[RawDataset,
                                                                 list[bytes]]) -> None:
    ds, images = packed
    locations = list(ds.records.location)
    assert [ds.read_bytes(loc) for loc in locations] == images
    assert [ds.encoded_size(loc) for loc in locations] == [len(data) for data in images]
    decoded = ds.decode(locations[1])
    assert (decoded.width, decoded.height, decoded.mode, decoded.nbytes) == (3, 5, "L",
                                                                             len(images[1]))
    assert np.asarray(decoded.image).max() == 200
    with pytest.raises(UndecodableImage, match=f"^{re.escape(locations[2])}: "):
        ds.decode(locations[2])
    past_end = raw.packed_location(len(b"".join(images)) - 2, 10)
    with pytest.raises(UndecodableImage, match=r"past the end of images\.bin"):
        ds.read_bytes(past_end)
    assert list(ds.records.source_path) == [f"top/train/c/{i}.png" for i in range(4)]


def _decode_all(task: tuple[RawDataset, list[str]]) -> list[tuple[int, int]]:
    ds, locations = task
    return [(ds.decode(loc).width, ds.decode(loc).nbytes) for loc in locations]


def test_the_memory_map_is_per_process_and_never_pickled(packed: tuple[RawDataset,
                                                                       list[bytes]]) -> None:
    ds, _ = packed
    good = [loc for i, loc in enumerate(ds.records.location) if i != 2]
    expected = _decode_all((ds, good))  # opens the map here first
    assert "_blobs" in ds.__dict__
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned worker would get
    assert "_blobs" not in copy.__dict__ and _decode_all((copy, good)) == expected
    methods = mp.get_all_start_methods()
    context = mp.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        results = list(pool.map(_decode_all, [(ds, good[:2]), (ds, good[2:])]))
    assert results[0] + results[1] == expected


def test_files_datasets_written_without_source_path_still_load(tmp_path: Path) -> None:
    """Other stages' tests build small ``files`` datasets with the original five columns."""
    (tmp_path / "files" / "train" / "c").mkdir(parents=True)
    (tmp_path / "files" / "train" / "c" / "a.png").write_bytes(png(50))
    records = pd.DataFrame({"id": ["train/c/a.png"], "split": ["train"], "class_id": [0],
                            "class_name": ["c"], "location": ["files/train/c/a.png"]})
    raw.write_records(tmp_path, records)
    raw.write_meta(tmp_path, {"kind": "files", "classes": ["c"]})
    ds = RawDataset.load(tmp_path)
    assert list(ds.records.columns) == list(raw.RECORD_COLUMNS)
    assert ds.records.source_path.tolist() == [""]
    assert ds.read_bytes("files/train/c/a.png") == png(50)
    assert ds.decode("files/train/c/a.png").nbytes == len(png(50))
    (tmp_path / "records.csv").write_text(  # a records.csv from before the column existed
        "id,split,class_id,class_name,location\ntrain/c/a.png,train,0,c,files/train/c/a.png\n")
    assert RawDataset.load(tmp_path).records.source_path.tolist() == [""]
    with pytest.raises(ValueError, match="lack columns"):
        raw.write_records(tmp_path, records.drop(columns="location"))
