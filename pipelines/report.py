"""The markdown summary the flow publishes as a Prefect artifact at its end.

It shows what a reviewer opens the run for: the model comparison table that
the evaluate stage writes (``reports/evaluate/comparison.md``), or, when the
run stopped earlier, each stage's metrics from ``metrics/<stage>.json``; and
links to the MLflow runs (parent and one per stage, executed or reused).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refinery import fsutil, paths
from refinery.params import flatten
from refinery.tracking import PipelineRecord

COMPARISON = Path("reports/evaluate/comparison.md")
COMPARISON_STAGE = "evaluate"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _link(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else f"`{text}`"


def stage_metrics_table(workspace: Path, stages: Sequence[str],
                        record: PipelineRecord) -> str:
    states = {s.stage: s for s in record.stages}
    rows = ["| stage | state | MLflow run | metrics |", "| --- | --- | --- | --- |"]
    for stage in stages:
        info = states.get(stage)
        values = flatten(fsutil.read_json_object(workspace / paths.metrics_file(stage)))
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(values.items())) or "-"
        run = _link(info.run_id[:12], info.url) if info else "-"
        rows.append(f"| {stage} | {info.state if info else 'not run'} | {run} | {shown} |")
    return "\n".join(rows)


def summary_markdown(record: PipelineRecord, workspace: Path, stages: Sequence[str],
                     failed: bool, error: str | None = None) -> str:
    status = "FAILED" if failed else "COMPLETED"
    lines = [f"# refinery pipeline: {status}", ""]
    if error:
        lines += ["```", error, "```", ""]
    comparison = workspace / COMPARISON
    if COMPARISON_STAGE in stages and comparison.exists() and not failed:
        lines += ["## Model comparison", "", comparison.read_text(encoding="utf-8").strip(), ""]
    else:
        lines += ["## Stage metrics", "", stage_metrics_table(workspace, stages, record), ""]
    lines += ["## MLflow", "",
              f"- pipeline (parent run): {_link(record.parent_run_id, record.parent_url)}"
              f" in experiment `{record.experiment}`"]
    for info in record.stages:
        lines.append(f"- {info.stage} ({info.state}): {_link(info.run_id, info.url)}")
    if record.deferred:
        lines += ["", "The tracking server was unreachable: records are spooled locally; "
                  "run `python -m refinery sync-tracking` once it is back."]
    elif not record.parent_url:
        lines += ["", "Local MLflow store: open it with `mlflow ui --backend-store-uri "
                  "sqlite:///mlflow/mlflow.db` from the repository root."]
    lines += ["", f"pipeline id `{record.pipeline_id}`"]
    return "\n".join(lines) + "\n"
