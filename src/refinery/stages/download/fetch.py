"""Fetch a source URL or path to a verified local file.

Why this is more than ``requests.get``: a data pipeline must never take a
short, corrupted or substituted file for the real one, and must not download
170 MB again on every run. So:

* a ``sha256:``/``md5:`` checksum is verified before the file is used; a
  mismatch deletes the bytes and names expected, actual and the URL;
* HTTP downloads go to ``<cache>/<name>.part`` and are renamed into place only
  once complete and verified; transient failures (5xx, 429, resets, timeouts,
  a body cut short) are retried with exponential backoff, resuming with
  ``Range`` when the server allows it; a ``Retry-After`` on 429/503 is honoured
  (never waiting less than the server asks, up to :data:`MAX_RETRY_AFTER_S`);
* a verified cached file is reused without any network request; without a
  checksum (an *unpinned* source) it is reused only when its sidecar records
  the same URL, and the log says so;
* ``file://`` URLs and plain paths are read in place (no copy) and verified;
* a failed download leaves nothing behind: no part file, and no cache folder
  it had to create.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import requests
import urllib3

from refinery import fsutil
from refinery.errors import ChecksumMismatch, DownloadError
from refinery.params import HttpParams
from refinery.progress import byte_bar

log = logging.getLogger(__name__)

CHUNK = 1 << 16
#: HTTP statuses worth retrying: the server may well answer the next request.
TRANSIENT_STATUS = frozenset({408, 429})
#: Statuses whose ``Retry-After`` header says when to try again (RFC 9110 10.2.3).
RETRY_AFTER_STATUS = frozenset({429, 503})
#: A server asking for a longer wait than this fails the download instead of hanging it.
MAX_RETRY_AFTER_S = 600.0
#: Exceptions of a connection that failed or broke mid-body (requests wraps some, not all).
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,  # raw-stream errors: ProtocolError, ReadTimeoutError, ...
    ConnectionError,
    TimeoutError,
)
_SECRET_QUERY_KEYS = re.compile(r"(token|sig|signature|key|secret|password|credential|auth)",
                                re.IGNORECASE)


@dataclass(frozen=True)
class Fetched:
    """A local, verified copy of the source, and what it took to get it."""

    path: Path
    url: str  # redacted: safe to log and record
    sha256: str
    size: int
    reused_cache: bool
    network_bytes: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0
    waits: tuple[float, ...] = ()  # seconds slept before each retry


class _Transient(Exception):
    """A failed attempt that the next one may fix (retried with backoff)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# ----------------------------------------------------------------------- helpers


def redact_url(url: str) -> str:
    """The URL without user:password and with secret-looking query values masked."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    query = "&".join(
        f"{k}=***" if _SECRET_QUERY_KEYS.search(k) else (f"{k}={v}" if sep else k)
        for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def parse_checksum(checksum: str | None) -> tuple[str, str] | None:
    """``"md5:ABC.."`` -> ``("md5", "abc..")``; the params schema already checked the form."""
    if not checksum:
        return None
    algo, _, digest = checksum.partition(":")
    if algo not in ("sha256", "md5") or not digest:
        raise DownloadError(f"checksum {checksum!r}: expected 'sha256:<hex>' or 'md5:<hex>'")
    return algo, digest.lower()


def file_digests(path: Path, algos: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of a file in one read pass (``sha256`` always useful, ``md5`` if pinned)."""
    hashers = {algo: hashlib.new(algo) for algo in algos}
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            for hasher in hashers.values():
                hasher.update(block)
    return {algo: hasher.hexdigest() for algo, hasher in hashers.items()}


def _verify(path: Path, url: str, checksum: str | None) -> str:
    """Return the file's sha256; raise :class:`ChecksumMismatch` if it is not the pinned file."""
    pinned = parse_checksum(checksum)
    algos = ("sha256",) if pinned is None or pinned[0] == "sha256" else ("sha256", pinned[0])
    digests = file_digests(path, algos)
    if pinned is not None and digests[pinned[0]] != pinned[1]:
        raise ChecksumMismatch(
            f"{url}: checksum mismatch: expected {pinned[0]}:{pinned[1]}, "
            f"got {pinned[0]}:{digests[pinned[0]]} ({path.stat().st_size} bytes); "
            "the source changed or the download is corrupt"
        )
    return digests["sha256"]


def cache_name(url: str) -> str:
    """A safe file name for the cache, from the URL's last path component."""
    name = Path(unquote(urlsplit(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return name or "download"


def local_path(url: str) -> Path | None:
    """The local file a ``file://`` URL or plain path names; ``None`` for http(s)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"{url}: a file:// URL must name a local file "
                                f"(host {parts.netloc!r})")
        return Path(url2pathname(parts.path))
    if len(parts.scheme) > 1:  # one letter would be a Windows drive, not a scheme
        raise DownloadError(f"{url}: unsupported URL scheme {parts.scheme!r} "
                            "(expected http://, https://, file:// or a path)")
    return Path(url).expanduser()


# ------------------------------------------------------------------------- fetch


def fetch(url: str, cache_dir: Path, checksum: str | None, http: HttpParams) -> Fetched:
    """Return a verified local file for ``url`` (downloading into ``cache_dir`` if needed)."""
    started = time.perf_counter()
    path = local_path(url)
    if path is not None:
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise DownloadError(f"{url}: local source {path} {what}")
        sha256 = _verify(path, url, checksum)
        log.info("using local source %s in place (%d bytes)", path, path.stat().st_size)
        return Fetched(path, url, sha256, path.stat().st_size, reused_cache=False,
                       seconds=time.perf_counter() - started)
    return _Downloader(url, Path(cache_dir), checksum, http).run(started)


class _Downloader:
    """One HTTP(S) download with cache, retries, resume and verification."""

    def __init__(self, url: str, cache_dir: Path, checksum: str | None, http: HttpParams):
        self.url, self.shown = url, redact_url(url)
        self.checksum, self.http = checksum, http
        self.target = cache_dir / cache_name(url)
        self.part = self.target.with_name(self.target.name + ".part")
        self.sidecar = self.target.with_name(self.target.name + ".source.json")
        self.url_id = hashlib.sha256(url.encode()).hexdigest()
        self.requests = self.network_bytes = self.retries = 0
        self.waits: list[float] = []
        self.validator: str | None = None  # ETag/Last-Modified of the first response

    def run(self, started: float) -> Fetched:
        cached = self._cached()
        if cached is not None:
            size = self.target.stat().st_size
            return Fetched(self.target, self.shown, cached, size, reused_cache=True,
                           seconds=time.perf_counter() - started)
        created = fsutil.make_dirs(self.target.parent)
        fsutil.remove(self.part)  # a stale part of a killed run: its origin is unknown
        try:
            total = self._download_with_retries()
            sha256 = _verify(self.part, self.shown, self.checksum)
        except BaseException:
            fsutil.remove(self.part)
            fsutil.remove_empty(created)
            raise
        self.part.replace(self.target)
        fsutil.write_json(self.sidecar, {
            "url": self.shown, "url_sha256": self.url_id, "sha256": sha256, "size": total,
            "checksum": self.checksum, "validator": self.validator,
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        })
        log.info("downloaded %s: %d bytes in %d request(s), sha256 %s", self.shown, total,
                 self.requests, sha256)
        return Fetched(self.target, self.shown, sha256, total, reused_cache=False,
                       network_bytes=self.network_bytes, requests=self.requests,
                       retries=self.retries, seconds=time.perf_counter() - started,
                       waits=tuple(self.waits))

    # -- cache

    def _cached(self) -> str | None:
        """sha256 of a reusable cached file, or ``None`` if it must be downloaded."""
        if not self.target.is_file():
            return None
        if self.checksum:
            try:
                sha256 = _verify(self.target, self.shown, self.checksum)
            except ChecksumMismatch:
                log.warning("cached %s does not match %s; downloading again", self.target,
                            self.checksum)
                return None
            log.info("reusing cached %s (checksum %s verified, no download)", self.target,
                     self.checksum)
            return sha256
        try:
            meta: dict[str, Any] = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("url_sha256") != self.url_id:
            return None
        sha256 = file_digests(self.target)["sha256"]
        if sha256 != meta.get("sha256"):
            log.warning("cached %s changed since it was downloaded; downloading again",
                        self.target)
            return None
        log.warning("unpinned source: reusing %s downloaded from %s at %s without a checksum "
                    "(sha256 %s); set download.checksum: sha256:%s to pin it",
                    self.target, self.shown, meta.get("fetched_at"), sha256, sha256)
        return sha256

    # -- network

    def _download_with_retries(self) -> int:
        attempts = self.http.retries + 1
        for attempt in range(1, attempts + 1):
            asked: float | None = None
            try:
                return self._attempt()
            except _Transient as exc:
                reason, asked = str(exc), exc.retry_after
            except requests.exceptions.SSLError as exc:  # a certificate problem stays one
                raise DownloadError(f"{self.shown}: TLS error (not retried): {exc}") from None
            except NETWORK_ERRORS as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except requests.RequestException as exc:  # invalid URL and the like
                raise DownloadError(f"{self.shown}: {type(exc).__name__}: {exc}") from None
            if attempt == attempts:
                offline = (f"; to work offline, place the file at {self.target} (it is used "
                           "when it matches the checksum)" if self.checksum else "")
                raise DownloadError(f"{self.shown}: download failed after {attempts} "
                                    f"attempt(s): {reason}{offline}")
            delay = self.http.backoff_s * 2 ** (attempt - 1)
            if asked is not None:
                if asked > MAX_RETRY_AFTER_S:
                    raise DownloadError(f"{self.shown}: {reason}; the server asks to retry "
                                        f"after {asked:.0f}s (more than {MAX_RETRY_AFTER_S:.0f}s"
                                        "): try again later")
                delay = max(delay, asked)
                reason += f", Retry-After {asked:.0f}s"
            self.retries += 1
            self.waits.append(delay)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", self.shown,
                        attempt, attempts, reason, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _attempt(self) -> int:
        """One request; return the complete size, or raise (``_Transient`` to retry)."""
        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # the bytes as stored: sizes and ranges hold
        if have:
            headers["Range"] = f"bytes={have}-"
            if self.validator:
                headers["If-Range"] = self.validator  # changed upstream -> full 200 body
        timeout = (self.http.timeout_s, self.http.timeout_s)
        self.requests += 1
        with requests.get(self.url, headers=headers, stream=True, timeout=timeout) as resp:
            status = resp.status_code
            if status == 416 and have:
                total = _content_range_total(resp.headers.get("Content-Range"))
                if total == have:
                    return have  # the part was complete already
                self._restart("server refused the resume range")
            if status in TRANSIENT_STATUS or status >= 500:
                asked = (retry_after_seconds(resp.headers.get("Retry-After"))
                         if status in RETRY_AFTER_STATUS else None)
                raise _Transient(f"HTTP {status} {resp.reason}", retry_after=asked)
            if status not in (200, 206):
                raise DownloadError(f"{self.shown}: HTTP {status} {resp.reason} "
                                    "(not retried: the request itself was refused)")
            start, total = 0, _int_header(resp.headers.get("Content-Length"))
            if status == 206:
                if not have:
                    raise _Transient("HTTP 206 to a request without Range")
                start, end, full = _parse_content_range(resp.headers.get("Content-Range"))
                if start != have or (total is not None and total != end - start + 1):
                    self._restart(f"bad Content-Range {resp.headers.get('Content-Range')!r} "
                                  f"for resume at byte {have}")
                total = full
            elif have:
                log.info("%s: server ignored the Range request; restarting from byte 0",
                         self.shown)
            if status == 200:
                self.validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            self._check_space(None if total is None else total - start)
            return self._stream(resp, start, total)

    def _stream(self, resp: requests.Response, start: int, total: int | None) -> int:
        written = start
        with open(self.part, "r+b" if start else "wb") as fh, \
                byte_bar(total, desc=self.target.name, initial=start) as progress:
            fh.seek(start)
            fh.truncate()
            for chunk in resp.raw.stream(CHUNK, decode_content=False):
                fh.write(chunk)
                written += len(chunk)
                self.network_bytes += len(chunk)
                progress.update(len(chunk))
                if total is not None and written > total:
                    break
        if total is not None and written != total:
            raise _Transient(f"got {written} of {total} bytes (connection cut short)")
        return written

    def _restart(self, why: str) -> None:
        fsutil.remove(self.part)
        raise _Transient(f"{why}; restarting from byte 0")

    def _check_space(self, needed: int | None) -> None:
        if needed is None:
            return
        free = shutil.disk_usage(self.part.parent).free
        if needed > free:
            raise DownloadError(f"{self.shown}: needs {needed} bytes but {self.part.parent} "
                                f"has {free} free")


def _int_header(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """``bytes 100-199/1000`` -> ``(100, 199, 1000)``; ``/*`` (unknown total) -> ``None``."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match or int(match.group(2)) < int(match.group(1)):
        raise _Transient(f"HTTP 206 with an invalid Content-Range {value!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    if total is not None and int(match.group(2)) >= total:
        raise _Transient(f"HTTP 206 with an invalid Content-Range {value!r}")
    return int(match.group(1)), int(match.group(2)), total


def _content_range_total(value: str | None) -> int | None:
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value or "")
    return int(match.group(1)) if match else None
