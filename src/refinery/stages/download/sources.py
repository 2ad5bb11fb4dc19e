"""Bring each kind of source into the one raw layout of :mod:`refinery.formats.raw`.

Three sources, three shapes, one result: the bundled scikit-learn digits and
the CIFAR-10 binary batches become uint8 pixel arrays (kind ``arrays``); an
image-folder archive keeps its files byte for byte, packed into one blob
(kind ``packed``), because decoding, and deciding what to do with a bad
file, is ``validate``'s job.

Layout problems are reported here, naming the folder, because a wrong
``train_split`` or a stray empty class folder is easier to fix from
"``val`` not found; found ``train``, ``valid``" than from a shape error later.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from refinery.errors import DataLayoutError
from refinery.formats.raw import PACKED_BLOB, packed_location
from refinery.params import DownloadParams
from refinery.splits import stratified_holdout
from refinery.stages.download.archive import PackedArchive, PackedMember, keep_members

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_RECORD = 1 + 3 * 32 * 32  # label byte, then the R, G and B planes of 32x32
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                 "test": ("test_batch.bin",)}
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


@dataclass
class SourceData:
    """A source in the raw layout: records, classes and what ``dataset.json`` says about it."""

    kind: Literal["packed", "arrays", "files"]
    classes: list[str]
    records: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        counts = self.records["split"].value_counts()
        return {split: int(counts.get(split, 0)) for split in SPLITS}

    def class_counts(self) -> dict[str, dict[str, int]]:
        grouped = self.records.groupby(["split", "class_name"]).size()
        return {split: {name: int(grouped.get((split, name), 0)) for name in self.classes}
                for split in SPLITS}


def is_junk(rel: str) -> bool:
    """OS droppings in a ``a/b/c`` path: hidden files/folders, ``__MACOSX/``, ``Thumbs.db``."""
    return any(part.startswith(".") or part.lower() in JUNK_NAMES for part in rel.split("/"))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask for a one-split source (see :func:`splits.stratified_holdout`)."""
    return stratified_holdout(labels, test_fraction, np.random.default_rng(seed))


def _array_records(split: str, labels: np.ndarray, classes: list[str],
                   ids: list[str] | np.ndarray, source_paths: list[str] | None = None
                   ) -> pd.DataFrame:
    rows = np.arange(len(labels))
    return pd.DataFrame({
        "id": list(ids),
        "split": split,
        "class_id": labels.astype(np.int64),
        "class_name": np.asarray(classes, dtype=object)[labels],
        "location": [f"arrays/{split}.npy#{row}" for row in rows],
        "source_path": source_paths if source_paths is not None else "",
    })


def _save_arrays(root: Path, pixels: dict[str, np.ndarray]) -> None:
    (root / "arrays").mkdir(parents=True, exist_ok=True)
    for split, array in pixels.items():
        np.save(root / "arrays" / f"{split}.npy", np.ascontiguousarray(array, dtype=np.uint8))


# ----------------------------------------------------------------------- builtin


def builtin_digits(root: Path, test_fraction: float, seed: int) -> tuple[SourceData, str]:
    """scikit-learn's 8x8 digits (bundled, no network), split with a seeded stratified split.

    Returns the data and the sha256 of the converted pixels and labels, which
    changes only if scikit-learn ships different digits.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    sha256 = hashlib.sha256(pixels.tobytes() + labels.astype("<i8").tobytes()).hexdigest()
    classes = [str(c) for c in range(10)]
    test = stratified_split(labels, test_fraction, seed)
    ids = np.asarray([f"digits:{i:04d}" for i in range(len(labels))])
    frames, arrays = [], {}
    for split, mask in (("train", ~test), ("test", test)):
        arrays[split] = pixels[mask]
        frames.append(_array_records(split, labels[mask], classes, ids[mask]))
    _save_arrays(root, arrays)
    meta = {"builtin": "digits", "split_names": {"train": None, "test": None},
            "test_split_origin": "seeded", "seed": seed, "test_fraction": test_fraction,
            "image_shape": [8, 8, 1]}
    return SourceData("arrays", classes, pd.concat(frames, ignore_index=True), meta), sha256


# ------------------------------------------------------------------ cifar binary


def _find_cifar_dir(extracted: Path) -> Path:
    found = sorted(p.parent for p in extracted.rglob("test_batch.bin"))
    if len(found) != 1:
        top = sorted(p.name for p in extracted.iterdir())
        what = "no test_batch.bin" if not found else f"{len(found)} test_batch.bin files"
        raise DataLayoutError(f"not a CIFAR-10 binary archive: {what} (expected "
                              f"cifar-10-batches-bin/{{data_batch_1..5,test_batch}}.bin; "
                              f"top-level entries: {top})")
    return found[0]


def _cifar_classes(folder: Path) -> list[str]:
    meta = folder / "batches.meta.txt"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    names = [line.strip() for line in meta.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]
    if len(set(names)) != len(names) or not names:
        raise DataLayoutError(f"{meta.name}: expected distinct class names, one a line; "
                              f"got {names}")
    return names


def read_cifar_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse one binary batch into (uint8 (N,32,32,3) pixels, int64 labels). No unpickling."""
    size = path.stat().st_size
    if size == 0 or size % CIFAR10_RECORD:
        raise DataLayoutError(
            f"{path.name}: {size} bytes is not a whole number of {CIFAR10_RECORD}-byte CIFAR-10 "
            "records (1 label byte + 3072 pixel bytes); truncated, or not CIFAR-10 binary")
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= n_classes)
    if bad.size:
        raise DataLayoutError(f"{path.name}: record {int(bad[0])} has label {labels[bad[0]]}, "
                              f"but there are {n_classes} classes")
    pixels = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(pixels), labels


def cifar10_binary(extracted: Path, root: Path) -> SourceData:
    """The CIFAR-10 binary batches under ``extracted`` as arrays in ``root``."""
    folder = _find_cifar_dir(extracted)
    missing = [name for names in CIFAR10_FILES.values() for name in names
               if not (folder / name).is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        raise DataLayoutError(f"{folder.name}/: missing {missing} (found {present})")
    classes = _cifar_classes(folder)
    frames, arrays = [], {}
    for split, names in CIFAR10_FILES.items():
        parts = [read_cifar_batch(folder / name, len(classes)) for name in names]
        arrays[split] = np.concatenate([pixels for pixels, _ in parts])
        labels = np.concatenate([lab for _, lab in parts])
        ids = [f"{split}:{i:06d}" for i in range(len(labels))]
        origin = folder.relative_to(extracted).as_posix()
        paths = [f"{origin}/{name}#{row}" for name, (_, lab) in zip(names, parts, strict=True)
                 for row in range(len(lab))]
        frames.append(_array_records(split, labels, classes, ids, paths))
    _save_arrays(root, arrays)
    meta = {"split_names": {"train": "data_batch_1..5.bin", "test": "test_batch.bin"},
            "test_split_origin": "source", "image_shape": [32, 32, 3]}
    return SourceData("arrays", classes, pd.concat(frames, ignore_index=True), meta)


# ------------------------------------------------------------------ image folder


class ArchiveTree:
    """The packed archive's folders and files as a tree, so the layout checks read like a walk.

    Built from the member list and the folders :func:`archive.pack` saw, so an
    explicit empty folder entry (an empty class folder) is in it too. Paths
    are ``a/b/c`` strings; ``""`` is the archive root.
    """

    def __init__(self, packed: PackedArchive):
        self.children: dict[str, dict[str, bool]] = {folder: {} for folder in packed.folders}
        for folder in packed.folders:
            if folder:
                parent, _, name = folder.rpartition("/")
                self.children[parent][name] = True
        for member in packed.members:
            parent, _, name = member.path.rpartition("/")
            self.children[parent][name] = False

    def is_dir(self, rel: str) -> bool:
        return rel in self.children

    def entries(self, folder: str) -> list[tuple[str, bool]]:
        """``(name, is_folder)`` of the non-junk entries directly in ``folder``, sorted."""
        return sorted((name, is_dir) for name, is_dir in self.children[folder].items()
                      if not is_junk(name))

    def files_under(self, folder: str) -> list[str]:
        """Every non-junk file below ``folder``, as sorted paths relative to it."""
        found: list[str] = []
        pending = [("", folder)]
        while pending:
            prefix, current = pending.pop()
            for name, is_dir in self.children[current].items():
                if is_junk(name):
                    continue
                if is_dir:
                    pending.append((f"{prefix}{name}/", _join(current, name)))
                else:
                    found.append(prefix + name)
        return sorted(found)


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


def _shown(folder: str) -> str:
    return f"{folder}/" if folder else "<archive root>"


def find_dataset_root(tree: ArchiveTree, split_folders: tuple[str, ...]) -> str:
    """Descend single top-level folders (``cifar10-jpeg/``) until the split folders show."""
    root = ""
    while True:
        entries = tree.entries(root)
        if any(name in split_folders and is_dir for name, is_dir in entries):
            return root
        if len(entries) == 1 and entries[0][1]:
            root = _join(root, entries[0][0])
            continue
        return root


def _scan_split(tree: ArchiveTree, folder: str) -> dict[str, list[str]]:
    """``{class: [files relative to the class folder]}`` of one split folder, checked."""
    entries = tree.entries(folder)
    loose = [name for name, is_dir in entries if not is_dir]
    if loose:
        raise DataLayoutError(
            f"{_shown(folder)}: {len(loose)} file(s) directly in the split folder "
            f"(e.g. {loose[:3]}); expected <split>/<class>/<image>")
    classes: dict[str, list[str]] = {}
    for name, _ in entries:
        classes[name] = tree.files_under(_join(folder, name))
        if not classes[name]:
            raise DataLayoutError(f"{_shown(_join(folder, name))}: class folder has no files")
    if not classes:
        raise DataLayoutError(f"{_shown(folder)}: no class folders "
                              "(expected <split>/<class>/<image>)")
    return classes


def _check_split_folders(tree: ArchiveTree, base: str, p: DownloadParams) -> None:
    found = [name for name, is_dir in tree.entries(base) if is_dir]
    for name in (p.train_split, p.test_split):
        if name is not None and not tree.is_dir(_join(base, name)):
            raise DataLayoutError(
                f"{_shown(base)}: no split folder {name!r} (found folders: "
                f"{found}); set download.train_split/test_split to the archive's folder "
                "names, or download.test_split: null for a single split")


@dataclass(frozen=True)
class _Row:
    """One image: its split and class here, its path in the class folder and in the archive."""

    split: str
    class_name: str
    rel: str
    source_path: str


def _two_splits(tree: ArchiveTree, base: str, p: DownloadParams) -> tuple[list[str], list[_Row]]:
    """Classes and rows of an archive with its own train and test folders."""
    assert p.test_split is not None
    _check_split_folders(tree, base, p)
    folders = {"train": _join(base, p.train_split), "test": _join(base, p.test_split)}
    scans = {split: _scan_split(tree, folder) for split, folder in folders.items()}
    extra = sorted(set(scans["test"]) - set(scans["train"]))
    if extra:
        raise DataLayoutError(f"{_shown(folders['test'])}: classes {extra} "
                              f"are not in the train split folder {p.train_split!r}")
    only_train = sorted(set(scans["train"]) - set(scans["test"]))
    if only_train:
        log.warning("classes %s have no images in the test split", only_train)
    rows = [_Row(split, name, rel, _join(folders[split], name, rel))
            for split, scan in scans.items() for name in sorted(scan) for rel in scan[name]]
    return sorted(scans["train"]), rows


def _one_split(tree: ArchiveTree, folder: str, p: DownloadParams,
               seed: int) -> tuple[list[str], list[_Row]]:
    """Classes and rows of a single split folder, divided by a seeded stratified split."""
    scan = _scan_split(tree, folder)
    classes = sorted(scan)
    flat = [(name, rel) for name in classes for rel in scan[name]]
    position = {name: i for i, name in enumerate(classes)}
    test = stratified_split(np.asarray([position[name] for name, _ in flat]),
                            p.test_fraction, seed)
    rows = [_Row("test" if is_test else "train", name, rel, _join(folder, name, rel))
            for (name, rel), is_test in zip(flat, test, strict=True)]
    return classes, rows


def _records(rows: list[_Row], classes: list[str],
             members: dict[str, PackedMember]) -> pd.DataFrame:
    """Records of ``rows``; ids stay ``<split>/<class>/<path in the class folder>``."""
    index = {name: i for i, name in enumerate(classes)}
    placed = [members[row.source_path] for row in rows]
    return pd.DataFrame({
        "id": [f"{row.split}/{row.class_name}/{row.rel}" for row in rows],
        "split": [row.split for row in rows],
        "class_id": np.asarray([index[row.class_name] for row in rows], dtype=np.int64),
        "class_name": [row.class_name for row in rows],
        "location": [packed_location(m.offset, m.length) for m in placed],
        "source_path": [row.source_path for row in rows],
    })


def image_folder(packed: PackedArchive, root: Path, p: DownloadParams, seed: int) -> SourceData:
    """The packed archive's ``<split>/<class>/<file>`` images as records into ``root/images.bin``.

    Bytes are never rewritten: what ``validate`` decodes is exactly what the
    archive held. ``packed`` must hold no junk (pack with ``skip=is_junk``).
    Files outside the dataset's split folders are dropped from the blob.
    """
    tree = ArchiveTree(packed)
    wanted = (p.train_split,) if p.test_split is None else (p.train_split, p.test_split)
    base = find_dataset_root(tree, wanted)
    meta: dict[str, Any]
    if p.test_split is not None:
        classes, rows = _two_splits(tree, base, p)
        names = {"train": p.train_split, "test": p.test_split}
        meta = {"test_split_origin": "source"}
    else:
        single = _join(base, p.train_split)
        folder = single if tree.is_dir(single) else base
        classes, rows = _one_split(tree, folder, p, seed)
        origin = "." if folder == base else p.train_split
        names = {"train": origin, "test": origin}
        meta = {"test_split_origin": "seeded", "seed": seed, "test_fraction": p.test_fraction}
    members = keep_members(packed, [row.source_path for row in rows], root / PACKED_BLOB)
    meta.update({"split_names": names, "dataset_root": base or "."})
    return SourceData("packed", classes, _records(rows, classes, members), meta)
