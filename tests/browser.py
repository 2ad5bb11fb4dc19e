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
