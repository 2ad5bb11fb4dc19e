"""``lineage/<stage>.json``: which MLflow run produced a stage's current outputs.

DVC caches and restores this file with the stage's other outputs (it is a
declared ``out`` of every stage in ``dvc.yaml``). So when DVC reuses a stage
instead of running it, the restored file still names the run that made those
outputs, and the pipeline's parent run can point at it. It is written last,
atomically, and only after the stage succeeded: a file that exists describes
a finished run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from refinery import fsutil, paths

log = logging.getLogger(__name__)

LINEAGE_DIR = paths.LINEAGE


@dataclass(frozen=True)
class Lineage:
    """The run behind a stage's outputs.

    ``run_id`` is the tracking server's id; it is ``None`` when the stage ran
    while the server was unreachable (``tracking.on_unreachable: defer``): then
    ``spool_run_id`` names the run in the local spool, and the replayed run on
    the server carries that id in its ``refinery.spool_run`` tag.
    """

    stage: str
    pipeline_id: str
    experiment: str
    run_id: str | None = None
    parent_run_id: str | None = None
    spool_run_id: str | None = None
    deferred: bool = False
    finished_at: str = ""
    #: the MLflow logged models the run made: model row name -> model id
    models: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def now() -> str:
        return datetime.now(UTC).isoformat(timespec="seconds")


def path_for(stage: str, workspace: Path | None = None) -> Path:
    return (workspace or Path(".")) / LINEAGE_DIR / f"{stage}.json"


def write(lineage: Lineage, workspace: Path | None = None) -> Path:
    """Write the record atomically (a crash never leaves half a file for DVC to cache)."""
    return fsutil.write_json(path_for(lineage.stage, workspace), asdict(lineage))


def read(stage: str, workspace: Path | None = None) -> Lineage | None:
    """The record of ``stage`` in the workspace, or ``None`` when absent or unreadable."""
    path = path_for(stage, workspace)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        fields = Lineage.__dataclass_fields__
        return Lineage(**{key: value for key, value in raw.items() if key in fields})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable lineage file %s: %s", path, exc)
        return None
