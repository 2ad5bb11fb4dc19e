"""Safe unpacking: hostile archives are refused by name and leave nothing behind, whether
extracted to files or packed into one blob (both go through the same checks)."""

from __future__ import annotations

import gzip
import io
import random
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from refinery.errors import DownloadError, UnsafeArchiveError
from refinery.params import ExtractLimits
from refinery.stages.download.archive import PackedArchive, detect_format, extract, pack

LIMITS = ExtractLimits(max_bytes=1 << 20, max_files=50)


def make_tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]],
             mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tf.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def tar_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def assert_nothing_left(work: Path) -> None:
    assert sorted(p.name for p in work.iterdir()) == ["archive"], "temp folder left behind"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "archive").mkdir()
    return tmp_path


def run(work: Path, archive: Path, limits: ExtractLimits = LIMITS) -> Path:
    dest = work / "out"
    extract(archive, dest, limits)
    return dest


Unpack = Callable[..., object]


@pytest.fixture(params=["extract", "pack"])
def unpack(request: pytest.FixtureRequest, work: Path) -> Unpack:
    """Both ways out of an archive; every safety test must hold for each."""
    if request.param == "extract":
        return lambda archive, limits=LIMITS: run(work, archive, limits)
    return lambda archive, limits=LIMITS: pack(archive, work / "out.bin", limits)


def blob_bytes(packed: PackedArchive) -> dict[str, bytes]:
    data = packed.blob.read_bytes()
    return {m.path: data[m.offset:m.offset + m.length] for m in packed.members}


def test_plain_tar_zip_and_hardlink_copy(work: Path) -> None:
    for name, mode in (("a.tar", "w"), ("a.tar.gz", "w:gz"), ("a.tar.xz", "w:xz")):
        dest = work / name.replace(".", "_")
        make_tar(work / "archive" / name, [("d/x.bin", b"x" * 10), ("d/y.bin", b""),
                                           tar_link("d/z.bin", "d/x.bin", tarfile.LNKTYPE)],
                 mode)
        stats = extract(work / "archive" / name, dest, LIMITS)
        assert (dest / "d" / "z.bin").read_bytes() == b"x" * 10
        assert not (dest / "d" / "z.bin").is_symlink() and stats.files == 3
    archive = make_zip(work / "archive" / "a.zip", [("d/", b""), ("d/x.bin", b"xyz")])
    assert detect_format(archive) == "zip"
    assert (run(work, archive) / "d" / "x.bin").read_bytes() == b"xyz"


@pytest.mark.parametrize(("entry", "message"), [
    ("../evil.txt", "'..' path component"),
    ("ok/../../evil.txt", "'..' path component"),
    ("/etc/evil.txt", "absolute path"),
])
def test_tar_path_traversal_is_refused(work: Path, unpack: Unpack, entry: str,
                                       message: str) -> None:
    archive = make_tar(work / "archive" / "a.tar.gz", [("ok/a.jpg", b"1"), (entry, b"2")])
    with pytest.raises(UnsafeArchiveError, match=message) as info:
        unpack(archive)
    assert repr(entry) in str(info.value)
    assert_nothing_left(work)
    assert not (work.parent / "evil.txt").exists()


@pytest.mark.parametrize(("entry", "message"), [
    ("../evil.txt", "'..' path component"),
    ("a\\..\\..\\evil.txt", "'..' path component"),
    ("/evil.txt", "absolute path"),
    ("C:/evil.txt", "absolute path"),
])
def test_zip_path_traversal_is_refused(work: Path, unpack: Unpack, entry: str,
                                       message: str) -> None:
    archive = make_zip(work / "archive" / "a.zip", [("ok/a.jpg", b"1"), (entry, b"2")])
    with pytest.raises(UnsafeArchiveError, match=message):
        unpack(archive)
    assert_nothing_left(work)


@pytest.mark.parametrize(("link", "target", "message"), [
    ("d/escape", "../../etc/passwd", "points outside the target folder"),
    ("d/abs", "/etc/passwd", "points outside the target folder"),
    ("d/inside", "x.bin", "not allowed in data archives"),
])
def test_symlinks_are_refused(work: Path, unpack: Unpack, link: str, target: str,
                              message: str) -> None:
    tar = make_tar(work / "archive" / "a.tar", [("d/x.bin", b"x"), tar_link(link, target)],
                   mode="w")
    with pytest.raises(UnsafeArchiveError, match=message) as info:
        unpack(tar)
    assert repr(link) in str(info.value)
    assert_nothing_left(work)
    zipped = make_zip(work / "archive" / "a.zip", [("d/x.bin", b"x"), zip_symlink(link, target)])
    with pytest.raises(UnsafeArchiveError, match=message):
        unpack(zipped)
    assert_nothing_left(work)


def test_hardlink_outside_or_forward_is_refused(work: Path, unpack: Unpack) -> None:
    for target in ("../../etc/passwd", "d/later.bin"):
        tar = make_tar(work / "archive" / "a.tar",
                       [tar_link("d/h", target, tarfile.LNKTYPE), ("d/later.bin", b"x")], "w")
        with pytest.raises(UnsafeArchiveError, match="hard link entry 'd/h'"):
            unpack(tar)
        assert_nothing_left(work)


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_device_files_and_fifos_are_refused(work: Path, unpack: Unpack, kind: bytes) -> None:
    info = tarfile.TarInfo("d/dev")
    info.type = kind
    tar = make_tar(work / "archive" / "a.tar", [("d/x.bin", b"x"), info], "w")
    with pytest.raises(UnsafeArchiveError, match="'d/dev' is a device file or FIFO"):
        unpack(tar)
    assert_nothing_left(work)


def test_bomb_over_max_bytes_is_stopped(work: Path, unpack: Unpack) -> None:
    zeros = bytes(3 << 20)  # 3 MiB of zeros: a few KiB compressed, over the 1 MiB cap
    tar = make_tar(work / "archive" / "bomb.tar.gz", [("d/zeros.bin", zeros)])
    assert tar.stat().st_size < 10_000
    with pytest.raises(UnsafeArchiveError, match=r"max_bytes=1048576 .*'d/zeros\.bin'"):
        unpack(tar)
    assert_nothing_left(work)
    zipped = make_zip(work / "archive" / "bomb.zip", [("d/zeros.bin", zeros)])
    with pytest.raises(UnsafeArchiveError, match="max_bytes"):
        unpack(zipped)
    assert_nothing_left(work)


def test_bomb_hiding_its_size_is_counted_while_written(work: Path, unpack: Unpack) -> None:
    """Many entries each under the cap: only the running total of written bytes catches it."""
    tar = make_tar(work / "archive" / "bomb.tar.gz",
                   [(f"d/{i}.bin", bytes(300_000)) for i in range(5)])
    with pytest.raises(UnsafeArchiveError, match=r"max_bytes.*'d/3\.bin'"):
        unpack(tar)
    assert_nothing_left(work)


def test_zeros_after_the_end_of_the_tar_count_too(work: Path, unpack: Unpack) -> None:
    """The stream is read to its end (for its CRC), so what follows the tar is capped too."""
    tar = make_tar(work / "archive" / "a.tar", [("d/x.bin", b"x")], "w").read_bytes()
    padded = work / "archive" / "padded.tar.gz"
    padded.write_bytes(gzip.compress(tar + bytes(3 << 20)))
    with pytest.raises(UnsafeArchiveError, match=r"max_bytes=1048576 .*after the end of the tar"):
        unpack(padded)
    assert_nothing_left(work)


def test_too_many_files_is_stopped(work: Path, unpack: Unpack) -> None:
    entries = [(f"d/{i}.bin", b"") for i in range(60)]
    for archive in (make_tar(work / "archive" / "many.tar.gz", entries),
                    make_zip(work / "archive" / "many.zip", entries)):
        with pytest.raises(UnsafeArchiveError, match="max_files=50"):
            unpack(archive)
        assert_nothing_left(work)


def test_corrupt_and_unknown_archives_are_clear_errors(work: Path, unpack: Unpack) -> None:
    good = make_tar(work / "archive" / "a.tar.gz", [("d/x.bin", bytes(range(256)) * 400)])
    cut = work / "archive" / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DownloadError, match="corrupt or truncated archive"):
        unpack(cut)
    not_archive = work / "archive" / "page.html"
    not_archive.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(DownloadError, match="not a supported archive"):
        unpack(not_archive)
    assert_nothing_left(work)


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz", "zip"])
def test_packed_blob_holds_each_member_at_its_offset(work: Path, mode: str) -> None:
    rng = random.Random(mode)
    files = {f"set/{split}/c{i % 3}/{i:03d}.jpg": rng.randbytes(rng.choice([0, 1, 700, 5000]))
             for i, split in enumerate(["train", "test"] * 20)}
    empty = "set/train/empty/"
    name = "a.zip" if mode == "zip" else f"a.tar{mode[1:].replace(':', '.')}"
    if mode == "zip":
        archive = make_zip(work / "archive" / name, [(empty, b""), *files.items()])
    else:
        folder = tarfile.TarInfo(empty.rstrip("/"))
        folder.type = tarfile.DIRTYPE
        archive = make_tar(work / "archive" / name, [folder, *files.items()], mode)
    packed = pack(archive, work / "out.bin", LIMITS)
    assert [m.path for m in packed.members] == list(files)  # archive order, one pass
    blob = packed.blob.read_bytes()
    for member in packed.members:
        assert blob[member.offset:member.offset + member.length] == files[member.path]
    assert len(blob) == sum(map(len, files.values())) == packed.stats.bytes
    assert {"", "set", "set/train", "set/train/c0", "set/train/empty"} <= packed.folders
    assert sorted(p.name for p in work.iterdir()) == ["archive", "out.bin"]  # no temp left


def test_packing_keeps_hardlinks_as_copies_and_refuses_to_overwrite(work: Path) -> None:
    archive = make_tar(work / "archive" / "a.tar.gz", [
        ("d/x.bin", b"x" * 10), ("d/y.bin", b""), tar_link("d/z.bin", "d/x.bin", tarfile.LNKTYPE),
        tar_link("d/w.bin", "./d/z.bin", tarfile.LNKTYPE)])
    packed = pack(archive, work / "out.bin", LIMITS)
    assert blob_bytes(packed) == {"d/x.bin": b"x" * 10, "d/y.bin": b"", "d/z.bin": b"x" * 10,
                                  "d/w.bin": b"x" * 10}
    assert packed.stats.files == 4 and packed.stats.bytes == 30  # a copy counts like a file
    with pytest.raises(FileExistsError):
        pack(archive, work / "out.bin", LIMITS)


def test_truncated_tar_streams_are_never_taken_for_shorter_archives(work: Path) -> None:
    """tarfile's own ``r|gz`` ends quietly at a cut that falls on a header; ours must not."""
    entries = [(f"d/{i}.bin", bytes([i]) * 3000) for i in range(30)]
    for mode in ("w:gz", "w:bz2", "w:xz"):
        data = make_tar(work / "archive" / "a.tar", entries, mode).read_bytes()
        cut = work / "archive" / "cut.tar"
        for size in range(10, len(data), max(1, len(data) // 60)):
            cut.write_bytes(data[:size])
            with pytest.raises(DownloadError, match="corrupt or truncated"):
                pack(cut, work / "out.bin", LIMITS)
            assert_nothing_left(work)


def test_skip_drops_junk_but_still_checks_names(work: Path) -> None:
    archive = make_zip(work / "archive" / "a.zip", [
        ("d/x.jpg", b"1"), ("__MACOSX/d/._x.jpg", b"2"), ("d/.DS_Store", b"3")])
    dest = work / "out"
    stats = extract(archive, dest, LIMITS, skip=lambda rel: rel.startswith("__MACOSX/")
                    or rel.rpartition("/")[2].startswith("."))
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["d", "d/x.jpg"]
    assert stats.skipped == 2
    packed = pack(archive, work / "out.bin", LIMITS, skip=lambda rel: rel.startswith("__MACOSX/")
                  or rel.rpartition("/")[2].startswith("."))
    assert blob_bytes(packed) == {"d/x.jpg": b"1"} and packed.stats.skipped == 2
    bad = make_zip(work / "archive" / "b.zip", [("__MACOSX/../../evil", b"")])
    with pytest.raises(UnsafeArchiveError):
        extract(bad, work / "out2", LIMITS, skip=lambda rel: True)
    with pytest.raises(UnsafeArchiveError):
        pack(bad, work / "out2.bin", LIMITS, skip=lambda rel: True)


def test_zip_headers_that_lie_about_size_do_not_get_through(work: Path, unpack: Unpack) -> None:
    honest = make_zip(work / "archive" / "a.zip", [("d/zeros.bin", bytes(3 << 20))])
    data = bytearray(honest.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local, central
        at = data.index(signature) + offset
        data[at:at + 4] = (100).to_bytes(4, "little")  # "100 bytes" for 3 MiB
    liar = work / "archive" / "liar.zip"
    liar.write_bytes(bytes(data))
    with pytest.raises((UnsafeArchiveError, DownloadError)):
        unpack(liar)
    assert_nothing_left(work)
