"""The MLflow model registry: log the models, tag the candidate, gate the champion.

The new int8 student always becomes ``candidate``. It becomes ``champion``
only if it passes the gate in ``params.registry.gate`` (minimum accuracy,
maximum drop versus the teacher, maximum batch-1 latency) *and* beats the
current champion's test accuracy. Every check and its numbers are recorded on
the model version, on the run and in ``registry.json``, accepted or not.

Accuracies are comparable only on the same test set, so every version is
tagged ``refinery.dataset`` (source and test-split digest, see
:func:`refinery.formats.prepared.dataset_identity`) and a champion measured on
another data set is never compared with: the candidate is not promoted, and
the reason says so. A deployment loading ``@champion`` must not silently
switch to a model of other data; give each data set its own
``registry.student_name`` (the profiles do), or move the alias by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refinery import fsutil
from refinery.params import GateParams, RegistryParams
from refinery.pipeline import ModelRow

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"


DATASET_TAG = "refinery.dataset"


@dataclass(frozen=True)
class Candidate:
    accuracy: float
    latency_p50_ms: float
    teacher_accuracy: float
    dataset: str = ""  # refinery.formats.prepared.dataset_identity of its test split


#: Two accuracies closer than this are a tie (test sets have far fewer than 10^6 images).
TIE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Champion:
    version: str
    accuracy: float | None
    dataset: str | None  # None: a version from before datasets were tagged


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    version: str | None = None
    previous_champion: str | None = None
    teacher_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(candidate: Candidate, gate: GateParams, champion: Champion | None) -> GateDecision:
    """Apply the gate; every check contributes one human-readable reason."""
    checks: list[tuple[bool, str]] = []
    acc, drop = candidate.accuracy, candidate.teacher_accuracy - candidate.accuracy
    checks.append((acc >= gate.min_accuracy,
                   f"accuracy {acc:.4f} {'>=' if acc >= gate.min_accuracy else '<'} "
                   f"min_accuracy {gate.min_accuracy:.4f}"))
    checks.append((drop <= gate.max_drop_vs_teacher,
                   f"drop vs teacher {drop:.4f} "
                   f"{'<=' if drop <= gate.max_drop_vs_teacher else '>'} "
                   f"max_drop_vs_teacher {gate.max_drop_vs_teacher:.4f}"))
    latency = candidate.latency_p50_ms
    checks.append((latency <= gate.max_latency_ms,
                   f"batch-1 p50 latency {latency:.2f} ms "
                   f"{'<=' if latency <= gate.max_latency_ms else '>'} "
                   f"max_latency_ms {gate.max_latency_ms:.2f}"))
    if champion is None:
        checks.append((True, "no current champion"))
    elif champion.dataset != candidate.dataset:
        checks.append((False, f"champion v{champion.version} was measured on another data set "
                              f"({champion.dataset or 'untagged'}), this candidate on "
                              f"{candidate.dataset}: not compared, not replaced; promote it by "
                              "hand or set registry.student_name for this data set"))
    elif champion.accuracy is None:
        checks.append((False, f"champion v{champion.version} has no test_accuracy tag"))
    else:
        # accuracies on one test set differ by at least 1/len(test) when they differ at all;
        # a champion tagged at 6 decimals by an older version is within 5e-7 of its value
        beats = acc - champion.accuracy > TIE_TOLERANCE
        checks.append((beats, f"accuracy {acc:.4f} {'beats' if beats else 'does not beat'} "
                              f"champion v{champion.version} ({champion.accuracy:.4f})"))
    return GateDecision(promote=all(ok for ok, _ in checks),
                        reasons=[("pass: " if ok else "FAIL: ") + text for ok, text in checks],
                        previous_champion=champion.version if champion else None)


def _champion(client: Any, name: str) -> Champion | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    value = version.tags.get("test_accuracy")
    return Champion(str(version.version), float(value) if value is not None else None,
                    version.tags.get(DATASET_TAG))


def register(run: Any, reg: RegistryParams, rows: Mapping[str, ModelRow],
             model_ids: Mapping[str, str], candidate: Candidate,
             tags: dict[str, str], out_file: Path) -> GateDecision:
    """Register the teacher and the int8 student from their logged models; gate the
    champion alias.

    ``rows``: ``{"teacher": ..., "student": ...}``; ``model_ids``: their logged
    models on the server the run logs to (:func:`refinery.logged_models.ensure_logged`).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    ids = {role: model_ids[row.name] for role, row in rows.items()}
    with run.active():  # the registry the run's records go to (the server, or the spool)
        teacher_mv = mlflow.register_model(f"models:/{ids['teacher']}", reg.teacher_name)
        student_mv = mlflow.register_model(f"models:/{ids['student']}", reg.student_name)
    client = MlflowClient()
    version = str(student_mv.version)
    decision = decide(candidate, reg.gate, _champion(client, reg.student_name))
    decision.version = version
    decision.teacher_version = str(teacher_mv.version)
    version_tags = {
        "test_accuracy": repr(float(candidate.accuracy)),  # full precision: compared later
        "latency_p50_ms": f"{candidate.latency_p50_ms:.4f}",
        "teacher_accuracy": f"{candidate.teacher_accuracy:.6f}",
        "gate": "passed" if decision.promote else "refused",
        "gate_reasons": "; ".join(decision.reasons),
        DATASET_TAG: candidate.dataset,
        **tags,
    }
    for key, value in version_tags.items():
        client.set_model_version_tag(reg.student_name, version, key, value)
    client.set_model_version_tag(reg.teacher_name, decision.teacher_version, "test_accuracy",
                                 f"{candidate.teacher_accuracy:.6f}")
    client.set_model_version_tag(reg.teacher_name, decision.teacher_version, DATASET_TAG,
                                 candidate.dataset)
    client.set_registered_model_alias(reg.student_name, CANDIDATE, version)
    if decision.promote:
        client.set_registered_model_alias(reg.student_name, CHAMPION, version)
    log.info("registry: %s v%s %s (%s)", reg.student_name, version,
             "promoted to champion" if decision.promote else "stays candidate",
             "; ".join(decision.reasons))
    run.set_tags({"registry.student_version": version,
                  "registry.decision": "champion" if decision.promote else "candidate",
                  "registry.reasons": "; ".join(decision.reasons)[:5000]})
    fsutil.write_json(out_file, {"student_model": reg.student_name,
                                 "teacher_model": reg.teacher_name, **decision.to_json()})
    return decision
