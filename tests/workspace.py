"""Build a pipeline workspace (a folder laid out like the repo root) for stage tests.

Stages read and write paths relative to the working directory, so a test runs
them in a temporary folder holding ``params.yaml`` and whatever upstream
outputs it needs, produced by the real stage functions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from refinery import paths
from refinery.params import Params, apply_overrides, parse_params

REPO = Path(__file__).resolve().parents[1]

#: Small enough for CI on two cores, big enough that accuracy means something.
TINY_TRAINING: dict[str, Any] = {
    "engine.checkpoint_every_steps": 4,
    "engine.log_every_steps": 2,
    "pretrain.epochs": 2,
    "pretrain.min_steps": 0,  # the defaults' step floors are for real runs, not smoke tests
    "distill.min_steps": 0,
    "prune.min_steps": 0,
    "pretrain.batch_size": 128,
    "pretrain.knn_every": 1,
    "finetune.epochs": 12,
    "finetune.batch_size": 32,
    "distill.epochs": 2,
    "distill.batch_size": 128,
}


def write_params(root: Path, overrides: dict[str, Any] | None = None) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = apply_overrides(raw, overrides or {})
    params = parse_params(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return params


def run_cli(root: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m refinery <args>`` in ``root``, as DVC would run it."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", "refinery", *args], cwd=root, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"refinery {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def build_data(root: Path, params: Params) -> None:
    """download -> validate -> prepare -> augment, by calling the stage functions."""
    from refinery.stages.augment import augment
    from refinery.stages.download import download
    from refinery.stages.prepare import prepare
    from refinery.stages.validate import validate

    cwd = Path.cwd()
    os.chdir(root)
    try:
        download(params.download, out_dir=paths.RAW, cache_dir=paths.DOWNLOAD_CACHE,
                 seed=params.seed)
        validate(params.validate_params, images=params.images, raw_dir=paths.RAW,
                 manifest_path=paths.MANIFEST,
                 reports_dir=paths.reports_dir("validate")).raise_if_failed()
        prepare(params.prepare, images=params.images, seed=params.seed, raw_dir=paths.RAW,
                manifest_path=paths.MANIFEST, out_dir=paths.PREPARED)
        augment(params.augment, prepared_dir=paths.PREPARED, out_dir=paths.AUGMENT,
                seed=params.seed)
    finally:
        os.chdir(cwd)


def copy_workspace(source: Path, target: Path, parts: tuple[str, ...] = ("params.yaml", "data")
                   ) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for part in parts:
        src = source / part
        if src.is_dir():
            shutil.copytree(src, target / part)
        elif src.exists():
            shutil.copy2(src, target / part)
    return target
