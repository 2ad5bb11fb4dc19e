"""``data/augment/policies.json``: the resolved augmentation policies the training stages use.

Written by the ``augment`` stage, read by ``pretrain``, ``finetune`` and
``distill`` with :func:`load_policies`. A version number guards against a
file written by other code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refinery.augment.selfsup import SslPolicy
from refinery.augment.supervised import SupervisedPolicy
from refinery.errors import ParamsError

FORMAT_VERSION = 1
POLICIES_FILE = "policies.json"


class PolicyError(ParamsError):
    """An augmentation setting that cannot work on the prepared images; names the key."""


def policies_document(supervised: SupervisedPolicy, ssl: SslPolicy) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "supervised": supervised.to_dict(),
            "ssl": ssl.to_dict()}


def load_policies(path: str | Path) -> tuple[SupervisedPolicy, SslPolicy]:
    """Read ``policies.json`` (a file, or the stage's output folder) back into policies."""
    path = Path(path)
    if path.is_dir():
        path = path / POLICIES_FILE
    doc = json.loads(path.read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise PolicyError(f"{path}: format_version {doc.get('format_version')!r}, this code "
                          f"reads {FORMAT_VERSION}; re-run the augment stage")
    try:
        return SupervisedPolicy.from_dict(doc["supervised"]), SslPolicy.from_dict(doc["ssl"])
    except (KeyError, TypeError) as exc:
        raise PolicyError(f"{path}: not a policies file this code reads ({exc}); re-run the "
                          "augment stage") from None
