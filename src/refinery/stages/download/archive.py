"""Safe unpacking of ``.tar``, ``.tar.gz``/``.tgz`` (also ``.bz2``/``.xz``) and ``.zip``.

Why not ``extractall``: an archive from the internet is untrusted input. An
entry named ``../../.bashrc`` or ``/etc/x``, a symlink pointing outside the
target, a device file, or a few kilobytes that inflate to terabytes must be
refused with a message that names the entry, before anything lands where a
later stage would read it. So every entry is checked here explicitly, bytes
are counted *as they are read* (headers can lie), and nothing is put in place
until the whole archive went through.

Two ways out, one set of checks (:func:`_tar_entry`, :func:`_zip_entry` and
:class:`_Sink`):

* :func:`extract` writes one file per entry into a new folder (a handful of
  big files, like the CIFAR-10 binary batches);
* :func:`pack` appends every regular file's bytes, untouched, to one blob and
  returns where each one is. Tens of thousands of small images are far
  cheaper as one file: creating 60k files costs more than decompressing them,
  and DVC hashes and caches one file instead of 60k.

Tar archives are read as a stream, one pass: the decompression is done by
:mod:`gzip`/:mod:`bz2`/:mod:`lzma` rather than tarfile's own ``r|*`` layer,
because those raise on a truncated or corrupted stream where ``r|*`` would
quietly end the archive early; the stream is read to its end (CRC included).

Links: image and dataset archives have no use for symbolic links, so every
symlink is refused (one that escapes the target is reported as such). A hard
link to a regular file read earlier from the same archive (tar stores
duplicate files that way) is stored as a copy; any other is refused.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, Literal, NamedTuple

from refinery.errors import DownloadError, UnsafeArchiveError
from refinery.params import ExtractLimits
from refinery.progress import byte_bar

log = logging.getLogger(__name__)

ArchiveFormat = Literal["tar", "zip"]
CHUNK = 1 << 20
_TAR_COMPRESSION_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
#: What a damaged archive raises; gzip/bz2 raise OSError subclasses *without* an errno.
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError)


@dataclass
class ExtractStats:
    """What one extraction or packing stored (and skipped)."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    skipped: int = 0
    seconds: float = 0.0
    skipped_examples: list[str] = field(default_factory=list)


class PackedMember(NamedTuple):
    """One regular file in a packed blob: its normalised ``a/b/c`` archive path and byte range.

    A NamedTuple, not a dataclass: there is one per image, tens of thousands.
    """

    path: str
    offset: int
    length: int


@dataclass
class PackedArchive:
    """What :func:`pack` produced: the blob and where each file's bytes are in it."""

    blob: Path
    members: list[PackedMember]  # regular files, in archive order
    folders: set[str]  # every folder: explicit entries and implied parents; "" is the root
    stats: ExtractStats


def detect_format(path: Path) -> ArchiveFormat:
    """Tell tar from zip by content, not by name (a URL may have no extension)."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(_TAR_COMPRESSION_MAGIC) or head[257:262] == b"ustar":
        return "tar"
    if len(head) == 512 and tarfile.is_tarfile(path):  # old v7 tar without the ustar magic
        return "tar"
    raise DownloadError(f"{path}: not a supported archive (.tar, .tar.gz/.tgz, .zip); "
                        f"it starts with {head[:8]!r}")


def safe_relative(name: str, *, archive: Path) -> str:
    """The entry's normalised ``a/b/c`` path under the target; refuse anything that could
    land outside it (``""`` is the target itself)."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has a NUL byte in its name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeArchiveError(f"{archive}: entry {name!r}: name is not valid UTF-8") from None
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":" and posix[0].isalpha()):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has a '..' path component")
    return "/".join(parts)


class _Sink:
    """Where checked entries go: the rules every way of storing them shares.

    The entry-type checks are in :func:`_tar_entry`/:func:`_zip_entry`; this
    keeps the namespace (a path is a file or a folder, never both; hard links
    only to files already stored), skips junk, and enforces the caps on
    entries and on bytes *actually read*. Subclasses only decide where a
    folder and a file's bytes go (:meth:`_make_folder`, :meth:`_store`,
    :meth:`_reopen`).

    Paths are plain ``str`` here (not pathlib): tens of thousands of small
    images make per-entry overhead the cost that matters.
    """

    verb = "store"  # for error messages: "cannot <verb> entry ..."

    def __init__(self, archive: Path, limits: ExtractLimits,
                 skip: Callable[[str], bool] | None):
        self.archive, self.limits, self.skip = archive, limits, skip
        self.stats = ExtractStats()
        self.written: set[str] = set()  # regular files so far, for hard links
        self.folders: set[str] = {""}  # folders known to exist

    def wanted(self, rel: str) -> bool:
        if rel and self.skip is not None and self.skip(rel):
            self.stats.skipped += 1
            if len(self.stats.skipped_examples) < 5:
                self.stats.skipped_examples.append(rel)
            return False
        return True

    def _count(self, name: str) -> None:
        if self.stats.files + self.stats.dirs >= self.limits.max_files:
            raise UnsafeArchiveError(
                f"{self.archive}: more than download.limits.max_files={self.limits.max_files} "
                f"entries (stopped at {name!r}); a decompression bomb, or raise the limit")

    def _folder(self, rel: str, name: str) -> None:
        if rel in self.folders:
            return
        if rel in self.written:
            raise UnsafeArchiveError(f"{self.archive}: entry {name!r} needs {rel!r} as a folder, "
                                     "but it is a file")
        self._folder(rel.rpartition("/")[0], name)
        self._count(name)  # implied folders count too: deep unique paths are a bomb as well
        self._make_folder(rel, name)
        self.folders.add(rel)
        self.stats.dirs += 1

    def directory(self, rel: str, name: str) -> None:
        self._folder(rel, name)

    def file(self, rel: str, name: str, source: IO[bytes]) -> None:
        if not rel:
            raise UnsafeArchiveError(f"{self.archive}: entry {name!r} has an empty name")
        if rel in self.folders:
            raise UnsafeArchiveError(f"{self.archive}: entry {name!r} is a file and a folder")
        self._count(name)
        self._folder(rel.rpartition("/")[0], name)
        self._store(rel, name, self._blocks(name, source))
        self.stats.files += 1
        self.written.add(rel)

    def copy_of(self, rel: str, name: str, target: str) -> None:
        """Store ``target``'s bytes again as ``rel`` (a hard link); counted like any file."""
        with self._reopen(target) as source:
            self.file(rel, name, source)

    def _blocks(self, name: str, source: IO[bytes]) -> Iterator[bytes]:
        """``source``'s bytes in chunks, stopping once the archive's total passes the cap."""
        while block := source.read(CHUNK):  # errors here are the archive's: corrupt data
            self.stats.bytes += len(block)
            self.check_inflated(self.stats.bytes, f"stopped in {name!r}")
            yield block

    def check_inflated(self, total: int, where: str) -> None:
        """Refuse the archive once ``total`` bytes read out of it pass ``max_bytes``."""
        if total > self.limits.max_bytes:
            raise UnsafeArchiveError(
                f"{self.archive}: expands to more than download.limits.max_bytes="
                f"{self.limits.max_bytes} bytes ({where}); a decompression bomb, or raise "
                "the limit")

    def _cannot(self, name: str, exc: OSError) -> DownloadError:
        return DownloadError(f"{self.archive}: cannot {self.verb} entry {name!r}: {exc}")

    def _make_folder(self, rel: str, name: str) -> None:
        raise NotImplementedError

    def _store(self, rel: str, name: str, blocks: Iterable[bytes]) -> None:
        raise NotImplementedError

    def _reopen(self, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        raise NotImplementedError


class _Writer(_Sink):
    """Stores each entry as a file under ``root``."""

    verb = "extract"

    def __init__(self, archive: Path, root: Path, limits: ExtractLimits,
                 skip: Callable[[str], bool] | None):
        super().__init__(archive, limits, skip)
        self.root = str(root)

    def _make_folder(self, rel: str, name: str) -> None:
        try:
            os.mkdir(os.path.join(self.root, rel))
        except OSError as exc:
            raise DownloadError(f"{self.archive}: cannot create folder for entry {name!r}: "
                                f"{exc}") from None

    def _store(self, rel: str, name: str, blocks: Iterable[bytes]) -> None:
        try:
            out = open(os.path.join(self.root, rel), "wb")  # noqa: SIM115 - errors differ
        except OSError as exc:
            raise self._cannot(name, exc) from None
        with out:
            for block in blocks:
                try:
                    out.write(block)
                except OSError as exc:
                    raise self._cannot(name, exc) from None

    def _reopen(self, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return open(os.path.join(self.root, rel), "rb")


class _BlobSlice:
    """A read-only file-like view of ``length`` bytes at ``offset`` of an open file."""

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.position, self.end = fd, offset, offset + length

    def read(self, size: int = -1) -> bytes:
        size = self.end - self.position if size < 0 else min(size, self.end - self.position)
        data = os.pread(self.fd, size, self.position) if size > 0 else b""
        self.position += len(data)
        return data


class _Packer(_Sink):
    """Appends each regular file's bytes to one open blob and remembers where they are.

    Folders are only remembered (the layout checks need them, an empty class
    folder included); nothing is created for them.
    """

    verb = "pack"

    def __init__(self, archive: Path, blob: BinaryIO, limits: ExtractLimits,
                 skip: Callable[[str], bool] | None):
        super().__init__(archive, limits, skip)
        self.blob, self.size = blob, 0
        self.members: list[PackedMember] = []
        self.index: dict[str, PackedMember] = {}

    def _make_folder(self, rel: str, name: str) -> None:
        pass

    def _store(self, rel: str, name: str, blocks: Iterable[bytes]) -> None:
        offset = self.size
        for block in blocks:
            try:
                self.blob.write(block)
            except OSError as exc:
                raise self._cannot(name, exc) from None
            self.size += len(block)
        member = PackedMember(rel, offset, self.size - offset)
        self.members.append(member)
        self.index[rel] = member

    def _reopen(self, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        self.blob.flush()  # the target's bytes may still sit in the write buffer
        member = self.index[rel]
        view = _BlobSlice(self.blob.fileno(), member.offset, member.length)
        return contextlib.nullcontext(view)  # type: ignore[arg-type]


def _walk(archive: Path, fmt: ArchiveFormat, sink: _Sink) -> None:
    """Feed every entry of ``archive`` to ``sink``; damage is a :class:`DownloadError`."""
    try:
        if fmt == "zip":
            _walk_zip(archive, sink)
        else:
            _walk_tar(archive, sink)
    except (UnsafeArchiveError, DownloadError):
        raise
    except _CORRUPT as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a real I/O error (disk full, permissions), not a bad archive
        raise DownloadError(f"{archive}: corrupt or truncated archive: "
                            f"{type(exc).__name__}: {exc}") from None


def _logged(what: str, archive: Path, stats: ExtractStats, started: float) -> None:
    stats.seconds = time.perf_counter() - started
    log.info("%s %s: %d files, %d folders, %d bytes in %.1fs (%d junk entries skipped)",
             what, archive.name, stats.files, stats.dirs, stats.bytes, stats.seconds,
             stats.skipped)


def extract(archive: Path, dest: Path, limits: ExtractLimits,
            skip: Callable[[str], bool] | None = None) -> ExtractStats:
    """Extract ``archive`` into the new folder ``dest``, all or nothing.

    ``skip("a/b/c")`` drops entries (junk like ``__MACOSX/``) after their
    names were checked: an unsafe name fails the archive even if it would be skipped.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; extract() only creates new folders")
    fmt = detect_format(archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extract", dir=dest.parent))
    started = time.perf_counter()
    try:
        writer = _Writer(archive, tmp, limits, skip)
        _walk(archive, fmt, writer)
        tmp.replace(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _logged("extracted", archive, writer.stats, started)
    return writer.stats


def pack(archive: Path, blob: Path, limits: ExtractLimits,
         skip: Callable[[str], bool] | None = None) -> PackedArchive:
    """Concatenate the bytes of ``archive``'s regular files, untouched, into the new file ``blob``.

    One streaming pass over the archive with exactly :func:`extract`'s checks
    and caps; ``skip`` as there. All or nothing: the blob is written under a
    temporary name beside ``blob`` and renamed only when the archive went through.
    """
    archive, blob = Path(archive), Path(blob)
    if blob.exists():
        raise FileExistsError(f"{blob} exists; pack() only creates new files")
    fmt = detect_format(archive)
    blob.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{blob.name}.", suffix=".pack", dir=blob.parent)
    started = time.perf_counter()
    try:
        with open(fd, "w+b", buffering=CHUNK) as out:
            packer = _Packer(archive, out, limits, skip)
            _walk(archive, fmt, packer)
        os.replace(tmp, blob)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _logged("packed", archive, packer.stats, started)
    return PackedArchive(blob, packer.members, packer.folders, packer.stats)


def keep_members(packed: PackedArchive, paths: Iterable[str],
                 dest: Path) -> dict[str, PackedMember]:
    """Move ``packed.blob`` to ``dest`` holding only the files ``paths``, in that order.

    Files the dataset does not use (a README beside the split folders, a
    split folder left out) would otherwise stay in the blob for DVC to cache.
    When every file is kept the blob is just renamed, offsets unchanged.
    Returns the kept files by path, with their offsets in ``dest``.
    """
    wanted = list(paths)
    index = {member.path: member for member in packed.members}  # a repeated path: last wins
    if len(set(wanted)) == len(packed.members):
        os.replace(packed.blob, dest)
        return index
    kept: dict[str, PackedMember] = {}
    offset = 0
    with open(packed.blob, "rb") as source, open(dest, "wb", buffering=CHUNK) as out:
        for path in wanted:
            member = index[path]
            view = _BlobSlice(source.fileno(), member.offset, member.length)
            while block := view.read(CHUNK):
                out.write(block)
            kept[path] = PackedMember(path, offset, member.length)
            offset += member.length
    packed.blob.unlink()
    return kept


# --------------------------------------------------------------------------- tar


def _tar_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members one by one without keeping them all: a bomb of empty entries stays small."""
    while (member := tf.next()) is not None:
        yield member
        tf.members.clear()  # tarfile keeps every header otherwise; we never look back


def _decompressed(raw: BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    """``raw`` decompressed by the stdlib reader its magic bytes name (plain tar as is)."""
    head = raw.read(6)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    return contextlib.nullcontext(raw)


def _drain(stream: BinaryIO, sink: _Sink) -> None:
    """Read what follows the tar's end marker, so the decompressor checks the stream's end.

    Normally a few KiB of zero padding; reading it is what makes a truncated
    or corrupted ``.gz``/``.bz2``/``.xz`` raise (end-of-stream marker, CRC).
    Counted against ``max_bytes`` like everything else that is inflated.
    """
    trailing = 0
    while block := stream.read(CHUNK):
        trailing += len(block)
        sink.check_inflated(sink.stats.bytes + trailing, "after the end of the tar")


def _walk_tar(archive: Path, sink: _Sink) -> None:
    """One streaming pass: every member is read once, in order, and never looked back at."""
    size = archive.stat().st_size
    with open(archive, "rb") as raw, _decompressed(raw) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tf, \
            byte_bar(size, desc=f"unpack {archive.name}") as progress:
        for member in _tar_members(tf):
            _tar_entry(tf, member, sink)
            with contextlib.suppress(OSError, ValueError):
                progress.update(raw.tell() - progress.n)
        _drain(stream, sink)


def _tar_entry(tf: tarfile.TarFile, member: tarfile.TarInfo, sink: _Sink) -> None:
    archive, name = sink.archive, member.name
    rel = safe_relative(name, archive=archive)
    if member.issym():
        target = f"{rel.rpartition('/')[0]}/{member.linkname}"
        escapes = member.linkname.startswith("/") or _escapes(target)
        how = "points outside the target folder" if escapes else "is not allowed in data archives"
        raise UnsafeArchiveError(f"{archive}: symlink entry {name!r} -> {member.linkname!r} {how}")
    if member.islnk():
        try:
            target = safe_relative(member.linkname, archive=archive)
        except UnsafeArchiveError:
            target = None
        if not target or target not in sink.written:
            raise UnsafeArchiveError(f"{archive}: hard link entry {name!r} -> "
                                     f"{member.linkname!r} does not name a file extracted "
                                     "before it from this archive")
        if sink.wanted(rel):
            sink.copy_of(rel, name, target)
        return
    if member.ischr() or member.isblk() or member.isfifo():
        raise UnsafeArchiveError(f"{archive}: entry {name!r} is a device file or FIFO")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an unsupported type "
                                 f"{member.type!r}")
    if not sink.wanted(rel):
        return
    if member.isdir():
        sink.directory(rel, name)
        return
    source = tf.extractfile(member)
    if source is None:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} cannot be read as a file")
    with source:
        sink.file(rel, name, source)


def _escapes(posix: str) -> bool:
    depth = 0
    for part in posix.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


# --------------------------------------------------------------------------- zip


def _walk_zip(archive: Path, sink: _Sink) -> None:
    limits = sink.limits
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:  # the central directory is cheap to count first
            raise UnsafeArchiveError(f"{archive}: {len(infos)} entries, more than "
                                     f"download.limits.max_files={limits.max_files}")
        claimed = sum(info.file_size for info in infos)
        if claimed > limits.max_bytes:  # fail fast on honest bombs; dishonest ones are counted
            raise UnsafeArchiveError(f"{archive}: entries claim {claimed} bytes, more than "
                                     f"download.limits.max_bytes={limits.max_bytes}")
        with byte_bar(sum(i.compress_size for i in infos), desc=f"unpack {archive.name}") as bar:
            for info in infos:
                _zip_entry(zf, info, sink)
                bar.update(info.compress_size)


def _zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, sink: _Sink) -> None:
    archive, name = sink.archive, info.filename
    rel = safe_relative(name, archive=archive)
    mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3: Unix permissions
    if stat.S_ISLNK(mode):
        with zf.open(info) as link:
            target = link.read(4096).decode("utf-8", "replace")
        resolved = f"{rel.rpartition('/')[0]}/{target}"
        escapes = target.startswith("/") or _escapes(resolved)
        how = "points outside the target folder" if escapes else "is not allowed in data archives"
        raise UnsafeArchiveError(f"{archive}: symlink entry {name!r} -> {target!r} {how}")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} is a device file, FIFO or socket")
    if info.flag_bits & 0x1:
        raise DownloadError(f"{archive}: entry {name!r} is encrypted; not supported")
    if not sink.wanted(rel):
        return
    if info.is_dir():
        sink.directory(rel, name)
        return
    with zf.open(info) as source:
        sink.file(rel, name, source)
