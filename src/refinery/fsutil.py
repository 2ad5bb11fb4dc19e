"""Atomic file and directory writes.

Every stage output is written to a temporary sibling and renamed into place, so
a crash, a kill or a bad input never leaves a half-written file where a later
stage (or DVC) would take it for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    The temporary file is removed if the body raises, so a failure leaves the
    previous ``target`` (or nothing) behind, never a partial file. The rename
    alone makes the write atomic for any process crash; ``durable`` also
    fsyncs, which only matters if the machine itself loses power (training
    checkpoints, rewritten every few seconds, skip it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
    try:
        yield tmp_path
        if durable:
            with contextlib.suppress(OSError), open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        if durable:
            _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def torch_save(obj: Any, target: str | os.PathLike[str], durable: bool = True) -> Path:
    """``torch.save`` atomically, to the same bytes for the same object.

    Through a file object, not the temporary path: ``torch.save(obj, path)`` names
    the zip archive inside after the file (``.model.pt.x1y2/data.pkl``), so every
    save would differ and DVC would see a new output each run.
    """
    import torch

    with atomic_path(target, durable=durable) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
    return Path(target)


def write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON file's object, or ``{}`` if it is missing, unreadable or not an object: for
    reports and run records that show what a stage left, never fail for what it did not."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` on success.

    On failure the temporary directory is deleted and ``target`` is untouched.
    The swap is two renames; a crash between them leaves ``target`` missing
    (never partial), which DVC and the stages treat as "not produced".
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
        old = None
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a file or directory if present."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def make_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """``mkdir -p``; returns the folders it created, deepest first (for :func:`remove_empty`)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty: a failed step leaves no trace."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
