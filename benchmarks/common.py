"""Shared set-up for the benchmarks: a workspace with prepared data, built once.

A benchmark works in a folder laid out like the repository root (``params.yaml``,
``data/``...), made from ``params.yaml`` plus a profile and overrides, and runs
stages there through the same CLI that DVC runs (or the stage functions).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
SHARED_SHA256 = "a20f75dab73b9c5c6f54e35c84da477e385f34a4615399fdbaef48b0e1e1c437"


def cifar_overrides(archive: Path = SHARED_CIFAR) -> dict[str, Any]:
    """The cifar10 profile, reading a CIFAR-10 JPEG image-folder archive from disk."""
    from refinery.params import flatten
    from refinery.profiles import profile_path
    from refinery.stages.download.fetch import file_digests

    overrides = flatten(yaml.safe_load(profile_path("cifar10").read_text()))
    digest = (SHARED_SHA256 if archive == SHARED_CIFAR
              else file_digests(archive)["sha256"])
    overrides.update({"download.source": "image-folder",
                      "download.url": archive.resolve().as_uri(),
                      "download.checksum": f"sha256:{digest}",
                      "download.test_split": "test"})
    if archive != SHARED_CIFAR:  # a subset (benchmarks/cifar_subset.py): fewer train rows
        overrides["validate.rows"] = {"train": [100, 50000], "test": [9900, 10000]}
    return overrides


def make_workspace(root: Path, overrides: dict[str, Any]) -> Any:
    """Write ``root/params.yaml`` = repo params + overrides (validated); return Params."""
    from refinery.params import apply_overrides, parse_params

    root.mkdir(parents=True, exist_ok=True)
    raw = apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    params = parse_params(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return params


def run_stage(root: Path, *args: str, env: dict[str, str] | None = None) -> float:
    """Run ``python -m refinery <args>`` in ``root``; return its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "refinery", *args], cwd=root, check=True,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        device = "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch "
            f"{torch.__version__}, load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d')}")


def commit_id() -> str:
    """HEAD's hash, ``+uncommitted`` when tracked files differ from it."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, check=False).stdout.strip()
    return commit + ("+uncommitted" if dirty else "")


def write_result(name: str, figures: dict[str, Any], path: Path | None = None) -> Path:
    """``docs/results/<name>.json`` (or ``path``): the figures with the machine, date, commit."""
    record = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "commit": commit_id(), **figures}
    path = path or REPO / "docs" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
