"""Where each stage reads and writes, relative to the repository root.

``dvc.yaml`` names the same paths; ``tests/test_stage_list.py`` fails if they drift apart.
"""

from pathlib import Path

DATA = Path("data")
DOWNLOAD_CACHE = DATA / "downloads"  # fetched archives, kept across runs (not a DVC output)
RAW = DATA / "raw"  # download: extracted/parsed source, one layout for every source
MANIFEST = DATA / "manifest.parquet"  # validate: one row per image
PIXELS = DATA / "pixels.npy"  # validate: the converted uint8 pixels of the manifest's rows
PREPARED = DATA / "prepared"  # prepare: packed uint8 tensors, splits, label subset
AUGMENT = DATA / "augment"  # augment: resolved policies

MODELS = Path("models")
PRETRAINED = MODELS / "pretrained"
TEACHER = MODELS / "teacher"
SCRATCH = MODELS / "scratch"
STUDENT = MODELS / "student"
STUDENT_INT8 = MODELS / "student-int8"

REPORTS = Path("reports")
METRICS = Path("metrics")
PLOTS = Path("plots")
CHECKPOINTS = Path("checkpoints")
LINEAGE = Path("lineage")  # lineage/<stage>.json: the MLflow run behind a stage's outputs


def metrics_file(stage: str) -> Path:
    return METRICS / f"{stage}.json"


def reports_dir(stage: str) -> Path:
    return REPORTS / stage


def details_file(stage: str) -> Path:
    """Every number a stage measured (timings too); ``metrics_file`` has its headline."""
    return reports_dir(stage) / "details.json"
