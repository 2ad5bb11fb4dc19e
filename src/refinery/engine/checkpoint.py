"""Training checkpoints: written atomically, resumed only by the run that made them.

A checkpoint carries a *fingerprint* of what produced it (stage, params, input
data). A stage restarted after a crash or SIGKILL resumes from the last
checkpoint only when the fingerprint matches; after a params change it starts
over, so a stale checkpoint can never leak into a different experiment.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from refinery import fsutil

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(stage: str, params: Any, inputs: list[Path]) -> str:
    """Hash of the stage name, its params and the bytes of its input files."""
    digest = hashlib.sha256()
    digest.update(stage.encode())
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    for path in sorted(inputs):
        digest.update(str(path).encode())
        digest.update(file_digest(path).encode() if path.is_file() else b"missing")
    return digest.hexdigest()


class Checkpointer:
    def __init__(self, directory: str | Path, fingerprint: str, enabled: bool = True) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.enabled = enabled
        self.saves = 0

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT_NAME

    def save(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fsutil.torch_save({"fingerprint": self.fingerprint, **state}, self.path, durable=False)
        self.saves += 1

    def load(self) -> dict[str, Any] | None:
        """The last checkpoint of this exact run, or None (missing, stale or unreadable)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn file cannot exist (atomic), but a foreign one can
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, exc)
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.info("checkpoint %s belongs to other params or data; starting over", self.path)
            return None
        return state

    def clear(self) -> None:
        if self.enabled:
            fsutil.remove(self.directory)
