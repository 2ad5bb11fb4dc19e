"""A real HTTP server on 127.0.0.1 for tests, with faults a test can script.

Why a real server and not a mocked ``requests``: retries, resume, timeouts and
a connection cut mid-body are behaviours of sockets and HTTP framing; only a
real server exercises them. Usage::

    server = LoopbackServer().start()
    url = server.serve("/data.tar.gz", payload, fail_times=2, drop_after=1000)
    ...
    assert server.count("/data.tar.gz") == 3
    server.stop()

(or the ``loopback_server`` fixture in ``conftest.py``, which stops it for you).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """What one path serves, and the faults still to inject (each counts down)."""

    body: bytes
    status: int = 200  # a fixed status (e.g. 404) instead of the body
    fail_times: int = 0  # answer fail_status this many times first
    fail_status: int = 503
    fail_headers: dict[str, str] = field(default_factory=dict)  # e.g. Retry-After
    drop_after: int | None = None  # once: send this many body bytes, then close the socket
    stall_s: float = 0.0  # once: sleep after the headers (a read timeout for the client)
    ranges: bool = True  # honour "Range: bytes=N-" with 206; False: always 200, full body
    content_range: str | None = None  # once: send this bogus Content-Range with a 206
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int


class LoopbackServer:
    """A ``ThreadingHTTPServer`` in a daemon thread; ``requests`` logs every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> LoopbackServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def serve(self, path: str, body: bytes = b"", **faults: object) -> str:
        """Serve ``body`` at ``path`` (with :class:`Route` faults); return its URL."""
        self.routes[path] = Route(body=body, **faults)  # type: ignore[arg-type]
        return self.url(path)

    def count(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if path is None or r.path == path)

    def ranges_requested(self, path: str) -> list[str]:
        with self._lock:
            return [r.headers["range"] for r in self.requests
                    if r.path == path and "range" in r.headers]

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    owner: LoopbackServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet tests
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.owner._log(Request(self.command, self.path.split("?")[0],
                                {k.lower(): v for k, v in self.headers.items()}, status))
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        route = self.owner.routes.get(self.path.split("?")[0])
        if route is None:
            self._reply(404, b"not found", {})
            return
        if route.status != 200:
            self._reply(route.status, b"scripted status", {})
            return
        if route.fail_times > 0:
            route.fail_times -= 1
            self._reply(route.fail_status, b"scripted failure", route.fail_headers)
            return
        body, status = route.body, 200
        headers = {"Accept-Ranges": "bytes" if route.ranges else "none", **route.headers}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted and route.ranges:
            start = int(wanted.group(1))
            end = min(int(wanted.group(2) or len(body) - 1), len(body) - 1)
            if start >= len(body):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                return
            status, body = 206, body[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(route.body)}"
            if route.content_range is not None:
                headers["Content-Range"], route.content_range = route.content_range, None
        if route.drop_after is not None:
            cut, route.drop_after = route.drop_after, None
            self._drop(status, body, headers, cut)
            return
        if route.stall_s:
            stall, route.stall_s = route.stall_s, 0.0
            self._stall(status, body, headers, stall)
            return
        self._reply(status, body, headers)

    def _drop(self, status: int, body: bytes, headers: dict[str, str], cut: int) -> None:
        """Promise the whole body, send ``cut`` bytes, and hang up."""
        self._reply(status, body[:cut], {**headers, "Content-Length": str(len(body))})
        self.wfile.flush()
        self.close_connection = True

    def _stall(self, status: int, body: bytes, headers: dict[str, str], stall: float) -> None:
        self.owner._log(Request(self.command, self.path.split("?")[0],
                                {k.lower(): v for k, v in self.headers.items()}, status))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        time.sleep(stall)
        self.close_connection = True
