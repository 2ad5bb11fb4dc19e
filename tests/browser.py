"""Headless Chromium (Debian's ``chromium`` package) for looking at real web UIs in tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def available() -> bool:
    return Path(CHROMIUM).exists()


def _flags(profile: Path, width: int, height: int, budget_ms: int) -> list[str]:
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}"]


def dump_dom(url: str, profile: Path, width: int = 1800, height: int = 1400,
             budget_ms: int = 20000) -> str:
    """The page's DOM after its scripts ran (a single-page app's rendered content)."""
    result = subprocess.run([*_flags(profile, width, height, budget_ms), "--dump-dom", url],
                            capture_output=True, text=True, timeout=180)
    return result.stdout


def screenshot(url: str, out: Path, profile: Path, width: int = 1800, height: int = 1400,
               budget_ms: int = 20000) -> Path:
    subprocess.run([*_flags(profile, width, height, budget_ms), f"--screenshot={out}", url],
                   capture_output=True, text=True, timeout=180, check=True)
    return out


class SignedInProxy:
    """A loopback HTTP proxy in front of a server that wants basic auth: it adds the
    ``Authorization`` header a signed-in browser would send. Chromium will not let a page
    whose address carries credentials (``http://user:pw@host``) call ``fetch``, and
    headless Chromium has no sign-in dialog, so the browser talks to this proxy instead.
    """

    def __init__(self, target: str, user: str, password: str) -> None:
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import requests

        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        hop = {"connection", "keep-alive", "transfer-encoding", "content-encoding",
               "content-length", "host"}

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                headers["Authorization"] = f"Basic {token}"
                upstream = requests.request(self.command, target + self.path, headers=headers,
                                            data=body, timeout=60, allow_redirects=False)
                self.send_response(upstream.status_code)
                for key, value in upstream.headers.items():
                    if key.lower() not in hop:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(upstream.content)))
                self.end_headers()
                self.wfile.write(upstream.content)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> SignedInProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
