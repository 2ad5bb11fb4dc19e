"""fetch(): retries, resume, timeouts, checksums and the cache, against a real loopback server."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from loopback import LoopbackServer

from refinery.errors import ChecksumMismatch, DownloadError
from refinery.params import HttpParams
from refinery.stages.download.fetch import cache_name, fetch, redact_url, retry_after_seconds

FAST = HttpParams(timeout_s=5, retries=3, backoff_s=0.01)
PAYLOAD = bytes(range(256)) * 1200  # 300 KiB: several chunks, so a cut lands mid-body


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_status_is_retried(loopback_server: LoopbackServer, tmp_path: Path,
                                     status: int) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD, fail_times=2, fail_status=status)
    got = fetch(url, tmp_path, sha256(PAYLOAD), FAST)
    assert got.path.read_bytes() == PAYLOAD
    assert loopback_server.count("/a.bin") == 3
    assert (got.requests, got.retries, got.reused_cache) == (3, 2, False)
    assert cache_files(tmp_path) == ["a.bin", "a.bin.source.json"]


def test_retries_exhausted_is_a_clear_error(loopback_server: LoopbackServer,
                                            tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD, fail_times=10)
    with pytest.raises(DownloadError, match=r"failed after 2 attempt\(s\): HTTP 503"):
        fetch(url, tmp_path, None, HttpParams(retries=1, backoff_s=0))
    assert loopback_server.count() == 2
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(loopback_server: LoopbackServer, tmp_path: Path,
                                 status: int) -> None:
    """The server's Retry-After wins over a shorter backoff (never ask again too early)."""
    url = loopback_server.serve("/a.bin", PAYLOAD, fail_times=2, fail_status=status,
                                fail_headers={"Retry-After": "1"})
    got = fetch(url, tmp_path, sha256(PAYLOAD), FAST)
    assert got.path.read_bytes() == PAYLOAD
    assert got.waits == (1.0, 1.0)  # FAST backs off 0.01 s, 0.02 s: the header decided


def test_a_retry_after_beyond_the_cap_fails_clearly(loopback_server: LoopbackServer,
                                                    tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD, fail_times=1, fail_status=429,
                                fail_headers={"Retry-After": "86400"})
    cache = tmp_path / "data" / "downloads"
    with pytest.raises(DownloadError, match=r"HTTP 429.*retry after 86400s.*try again later"):
        fetch(url, cache, sha256(PAYLOAD), FAST)
    assert loopback_server.count("/a.bin") == 1
    assert not (tmp_path / "data").exists()  # the folders it made for the cache are gone


def test_retry_after_forms() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds("Sun, 29 Nov 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("Sun, 29 Nov 2026 11:00:00 GMT", now) == 0.0  # in the past
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_a_failed_download_leaves_no_empty_cache_folder(loopback_server: LoopbackServer,
                                                        tmp_path: Path) -> None:
    cache = tmp_path / "data" / "downloads"
    (tmp_path / "data").mkdir()  # exists before: kept; downloads/ was made for this: removed
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(loopback_server.url("/missing.tar.gz"), cache, None, FAST)
    assert (tmp_path / "data").is_dir() and not cache.exists()


def test_404_is_not_retried(loopback_server: LoopbackServer, tmp_path: Path) -> None:
    url = loopback_server.url("/missing.tar.gz")
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch(url, tmp_path, None, FAST)
    assert url in str(info.value) and "not retried" in str(info.value)
    assert loopback_server.count() == 1
    assert cache_files(tmp_path) == []


def test_dropped_connection_resumes_with_range(loopback_server: LoopbackServer,
                                               tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD, drop_after=100_000)
    got = fetch(url, tmp_path, sha256(PAYLOAD), FAST)
    assert got.path.read_bytes() == PAYLOAD
    assert loopback_server.ranges_requested("/a.bin") == ["bytes=100000-"]
    assert got.network_bytes == len(PAYLOAD)  # nothing fetched twice
    assert [r.status for r in loopback_server.requests] == [200, 206]


def test_server_ignoring_range_restarts_from_zero(loopback_server: LoopbackServer,
                                                  tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD, drop_after=100_000, ranges=False)
    got = fetch(url, tmp_path, sha256(PAYLOAD), FAST)
    assert got.path.read_bytes() == PAYLOAD
    assert loopback_server.ranges_requested("/a.bin") == ["bytes=100000-"]
    assert [r.status for r in loopback_server.requests] == [200, 200]
    assert got.network_bytes == 100_000 + len(PAYLOAD)


def test_bad_content_range_restarts_from_zero(loopback_server: LoopbackServer,
                                              tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD, drop_after=1000,
                                content_range=f"bytes 0-99/{len(PAYLOAD)}")
    got = fetch(url, tmp_path, sha256(PAYLOAD), FAST)
    assert got.path.read_bytes() == PAYLOAD
    assert [r.status for r in loopback_server.requests] == [200, 206, 200]


def test_read_timeout_is_retried(loopback_server: LoopbackServer, tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD, stall_s=1.0)
    got = fetch(url, tmp_path, sha256(PAYLOAD), HttpParams(timeout_s=0.2, retries=2,
                                                            backoff_s=0))
    assert got.path.read_bytes() == PAYLOAD
    assert loopback_server.count() == 2


def test_short_body_without_resume_is_never_a_silent_short_file(
        loopback_server: LoopbackServer, tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD, drop_after=5000)
    with pytest.raises(DownloadError, match="failed after 1 attempt"):
        fetch(url, tmp_path, None, HttpParams(retries=0))
    assert cache_files(tmp_path) == []


def test_checksum_mismatch_names_both_and_leaves_nothing(loopback_server: LoopbackServer,
                                                         tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD)
    wrong = "md5:" + "0" * 32
    with pytest.raises(ChecksumMismatch) as info:
        fetch(url, tmp_path, wrong, FAST)
    message = str(info.value)
    assert wrong in message and hashlib.md5(PAYLOAD).hexdigest() in message and url in message
    assert cache_files(tmp_path) == []
    assert loopback_server.count() == 1  # a mismatch is not retried


def test_md5_checksum_is_accepted(loopback_server: LoopbackServer, tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD)
    got = fetch(url, tmp_path, "md5:" + hashlib.md5(PAYLOAD).hexdigest(), FAST)
    assert got.sha256 == hashlib.sha256(PAYLOAD).hexdigest()


def test_pinned_cache_is_reused_without_network(loopback_server: LoopbackServer,
                                                tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD)
    first = fetch(url, tmp_path, sha256(PAYLOAD), FAST)
    second = fetch(url, tmp_path, sha256(PAYLOAD), FAST)
    assert loopback_server.count() == 1
    assert second.reused_cache and second.requests == 0 and second.path == first.path
    # a file placed in the cache by hand (offline use) counts too, when it matches
    other = loopback_server.url("/mirror/a.bin")
    assert fetch(other, tmp_path, sha256(PAYLOAD), FAST).reused_cache
    assert loopback_server.count() == 1


def test_corrupted_cache_is_downloaded_again(loopback_server: LoopbackServer,
                                             tmp_path: Path) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD)
    got = fetch(url, tmp_path, sha256(PAYLOAD), FAST)
    got.path.write_bytes(b"garbage")
    again = fetch(url, tmp_path, sha256(PAYLOAD), FAST)
    assert not again.reused_cache and again.path.read_bytes() == PAYLOAD
    assert loopback_server.count() == 2


def test_unpinned_cache_needs_the_same_url(loopback_server: LoopbackServer, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    url = loopback_server.serve("/a.bin", PAYLOAD)
    fetch(url, tmp_path, None, FAST)
    with caplog.at_level(logging.WARNING, logger="refinery.stages.download.fetch"):
        assert fetch(url, tmp_path, None, FAST).reused_cache
    assert "unpinned source" in caplog.text
    assert loopback_server.count() == 1
    other = loopback_server.serve("/v2/a.bin", PAYLOAD[::-1])
    got = fetch(other, tmp_path, None, FAST)
    assert not got.reused_cache and got.path.read_bytes() == PAYLOAD[::-1]
    assert loopback_server.count() == 2


def test_local_path_and_file_url_are_read_in_place(tmp_path: Path) -> None:
    source = tmp_path / "src" / "a b.bin"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    for url in (str(source), source.as_uri()):
        got = fetch(url, cache, sha256(PAYLOAD), FAST)
        assert got.path == source and not cache.exists()
    with pytest.raises(ChecksumMismatch, match="expected sha256:"):
        fetch(str(source), cache, sha256(b"other"), FAST)
    assert source.exists()  # never delete the user's own file


def test_missing_local_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tar.gz"
    with pytest.raises(DownloadError, match=r"nope\.tar\.gz does not exist"):
        fetch(str(missing), tmp_path, None, FAST)
    with pytest.raises(DownloadError, match="does not exist"):
        fetch(missing.as_uri(), tmp_path, None, FAST)
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp'"):
        fetch("ftp://example.org/a.tar", tmp_path, None, FAST)


def test_credentials_never_reach_records(loopback_server: LoopbackServer,
                                         tmp_path: Path) -> None:
    assert redact_url("https://u:secret@h.org:8443/d/a.tgz?token=abc&x=1") == \
        "https://h.org:8443/d/a.tgz?token=***&x=1"
    url = loopback_server.serve("/a.bin", PAYLOAD).replace("http://", "http://user:pw@")
    got = fetch(url, tmp_path, None, FAST)
    assert "pw" not in got.url
    assert "pw" not in (tmp_path / "a.bin.source.json").read_text()
    assert cache_name("https://h/x/..%2F..%2Fevil") == "evil"
