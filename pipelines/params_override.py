"""Apply a flow's param overrides to ``params.yaml`` the way ``dvc exp run -S`` does.

DVC reads params from ``params.yaml`` by path, so a run with different params
has to change that file. This module does it without putting the user's file
at risk:

- the overrides are validated with the same schema as the file
  (``parse_params(apply_overrides(...))``) before anything is touched;
- the file is edited round-trip (ruamel, as DVC does), so comments and order
  survive, and written atomically;
- the original is recorded under ``.dvc/tmp/`` (ignored by git and DVC)
  before the edit and put back when the run ends, unless someone changed the
  file in between (then theirs is kept and the original stays recorded);
- a record left by a run that was killed is noticed by the next run, which
  restores the original first.

After a run with overrides the workspace's outputs match the overridden
params, not ``params.yaml``: ``dvc status`` shows the params as changed until
the next run, which DVC's run cache makes cheap when nothing else changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from refinery import fsutil
from refinery.params import Params, apply_overrides, parse_params

log = logging.getLogger(__name__)

RECORD = Path(".dvc/tmp/refinery-params-before-flow.json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate(params_file: Path, overrides: Mapping[str, Any]) -> Params:
    """The params the run will use; raises ``ParamsError`` naming every bad key."""
    raw = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    source = f"{params_file.name} with overrides" if overrides else params_file.name
    return parse_params(apply_overrides(raw, dict(overrides)), source=source)


def render(text: str, overrides: Mapping[str, Any]) -> str:
    """``text`` with dotted-key overrides set, comments and key order kept."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    rt = YAML()
    rt.preserve_quotes = True
    data = rt.load(text) or CommentedMap()
    for dotted, value in overrides.items():
        node = data
        *groups, leaf = dotted.split(".")
        for part in groups:
            if not isinstance(node.get(part), dict):
                node[part] = CommentedMap()
            node = node[part]
        node[leaf] = value
    out = io.StringIO()
    rt.dump(data, out)
    return out.getvalue()


def recover(workspace: Path) -> None:
    """Undo the edit of a run that died before restoring ``params.yaml``."""
    record_path = workspace / RECORD
    if not record_path.exists():
        return
    record = json.loads(record_path.read_text(encoding="utf-8"))
    params_file = workspace / record["file"]
    if params_file.exists() and _sha256(params_file.read_bytes()) == record["overridden_sha256"]:
        fsutil.write_text(params_file, record["original"])
        log.warning("restored %s: an earlier flow run ended before putting it back",
                    params_file.name)
    else:
        log.warning("an earlier flow run recorded the original %s in %s, but the file has "
                    "changed since; leaving it as is", params_file.name, record_path)
    record_path.unlink()


@contextlib.contextmanager
def overridden(workspace: Path, overrides: Mapping[str, Any] | None,
               params_name: str = "params.yaml") -> Iterator[Params]:
    """Validate, apply for the duration of the block, and put the original back."""
    params_file = workspace / params_name
    recover(workspace)
    overrides = dict(overrides or {})
    params = validate(params_file, overrides)
    if not overrides:
        yield params
        return
    original = params_file.read_text(encoding="utf-8")
    edited = render(original, overrides)
    record_path = workspace / RECORD
    fsutil.write_json(record_path, {"file": params_name, "original": original,
                                    "overridden_sha256": _sha256(edited.encode("utf-8")),
                                    "overrides": overrides})
    fsutil.write_text(params_file, edited)
    try:
        yield params
    finally:
        if _sha256(params_file.read_bytes()) == _sha256(edited.encode("utf-8")):
            fsutil.write_text(params_file, original)
            record_path.unlink(missing_ok=True)
        else:
            log.warning("%s was changed during the run; keeping the new content (the "
                        "original is in %s)", params_name, record_path)
