"""Do the pins install on every Python that pyproject claims? Checked against the index.

``requires-python`` promises versions CI does not run on (CI runs this
machine's 3.11). For each minor version it admits, every pin of
``constraints.txt`` must have a wheel for CPython on x86_64 Linux (glibc
2.39, Ubuntu 24.04's; Debian 13 has 2.41), or an sdist that is pure Python.
Reads the index's JSON simple API (PEP 691): file names only, nothing is
downloaded. Usage: ``python .ci/check_pins.py`` (exit 1 listing what is missing).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion

ROOT = Path(__file__).resolve().parents[1]
INDEX = os.environ.get("REFINERY_PIN_INDEX", "https://pypi.org/simple")
GLIBC_MINOR = 39
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(GLIBC_MINOR, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
#: sdist-only pins known to be pure Python (they build anywhere pip runs).
PURE_SDISTS = {"antlr4-python3-runtime"}


def claimed_pythons(pyproject: Path = ROOT / "pyproject.toml") -> list[tuple[int, int]]:
    spec = SpecifierSet(tomllib.loads(pyproject.read_text())["project"]["requires-python"])
    return [(3, minor) for minor in range(8, 20) if f"3.{minor}" in spec]


def pins(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    found = {}
    for line in constraints.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def supported_tags(version: tuple[int, int]) -> set[Tag]:
    interpreter = f"cp{version[0]}{version[1]}"
    return {*cpython_tags(python_version=version, platforms=PLATFORMS),
            *compatible_tags(python_version=version, interpreter=interpreter,
                             platforms=PLATFORMS)}


def files(name: str) -> list[str]:
    request = urllib.request.Request(f"{INDEX}/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        data = json.load(response)
    return [f["filename"] for f in data["files"] if not f.get("yanked")]


def installable(filenames: list[str], name: str, version: str, tags: set[Tag]) -> bool:
    for filename in filenames:
        if filename.endswith(".whl"):
            try:
                wheel_name, wheel_version, _, wheel_tags = parse_wheel_filename(filename)
            except (InvalidWheelFilename, InvalidVersion):  # ancient uploads
                continue
            if (wheel_name, str(wheel_version)) == (name, version) and wheel_tags & tags:
                return True
        elif name in PURE_SDISTS and filename.endswith((".tar.gz", ".zip")) and \
                f"-{version}." in filename:
            return True
    return False


def missing(pinned: dict[str, str], pythons: list[tuple[int, int]]) -> list[str]:
    with ThreadPoolExecutor(16) as pool:
        listings = dict(zip(pinned, pool.map(files, pinned), strict=True))
    problems = []
    for version in pythons:
        tags = supported_tags(version)
        for name, pin in pinned.items():
            if not installable(listings[name], name, pin, tags):
                problems.append(f"{name}=={pin}: no wheel for CPython {version[0]}.{version[1]} "
                                "on x86_64 Linux")
    return problems


def main() -> int:
    pythons = claimed_pythons()
    pinned = pins()
    problems = missing(pinned, pythons)
    shown = ", ".join(f"{a}.{b}" for a, b in pythons)
    if problems:
        print(f"pins that do not install on a claimed Python ({shown}):", *problems,
              sep="\n  ")
        return 1
    print(f"all {len(pinned)} pins have x86_64 Linux wheels for CPython {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
