"""The digits default end to end through evaluate, and the registry gate both ways.

Every stage runs as DVC would run it (``python -m refinery <stage>`` in a
workspace folder), against its own sqlite MLflow store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from workspace import TINY_TRAINING, build_data, run_cli, write_params

from refinery.pipeline import STAGES

pytestmark = pytest.mark.slow

SETTINGS = {
    **TINY_TRAINING,
    "distill.epochs": 8,
    "evaluate.latency.warmup": 2,
    "evaluate.latency.iterations": 10,
    "evaluate.latency.throughput_iterations": 2,
    "registry.gate.min_accuracy": 0.3,
    "registry.gate.max_drop_vs_teacher": 1.0,
    "registry.gate.max_latency_ms": 1000.0,
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("pipeline")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "REFINERY_PIPELINE_ID": "test-pipeline"}
    build_data(root, write_params(root, SETTINGS))
    names = [stage.name for stage in STAGES]
    for stage in STAGES[names.index("pretrain"):]:  # build_data ran the ones before
        run_cli(root, stage.cli, *stage.cli_args, env=env)
    return root, env


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_model_is_well_above_chance(pipeline: tuple[Path, dict[str, str]]) -> None:
    root, _ = pipeline
    metrics = _read(root / "reports/evaluate/details.json")
    assert set(metrics) == {"scratch", "teacher", "student", "student_int8"}
    headline = _read(root / "metrics/evaluate.json")  # what dvc metrics show compares
    assert {model: set(values) for model, values in headline.items()} == {
        model: {"accuracy", "macro_f1", "ece", "file_mb", "latency_p50_ms"} for model in metrics}
    for name, values in metrics.items():
        assert values["accuracy"] > 0.4, (name, values["accuracy"])  # chance is 0.1
        for key in ("macro_f1", "ece", "accuracy_gaussian_noise", "accuracy_jpeg",
                    "latency_p50_ms", "latency_p95_ms", "cpu_images_per_s", "parameters"):
            assert key in values, (name, key)
        assert values["latency_p50_ms"] <= values["latency_p95_ms"]
    assert metrics["student"]["parameters"] * 5 <= metrics["teacher"]["parameters"]
    # int8 keeps the student's accuracy closely and its file is much smaller
    assert abs(metrics["student_int8"]["accuracy"] - metrics["student"]["accuracy"]) < 0.05
    assert metrics["student_int8"]["file_mb"] * 2 < metrics["student"]["file_mb"]
    table = (root / "reports/evaluate/comparison.md").read_text()
    for name in metrics:
        assert f"| {name} |" in table
    assert "Pretraining: teacher minus scratch" in table
    for name in metrics:
        assert (root / f"reports/evaluate/{name}/confusion.png").stat().st_size > 1000
        assert (root / f"reports/evaluate/{name}/reliability.png").stat().st_size > 1000
        assert (root / f"plots/evaluate/confusion_{name}.csv").read_text().startswith(
            "actual,predicted")
    quantize = _read(root / "metrics/quantize.json")
    assert set(quantize) == {"int8_val_acc", "size_reduction"} and quantize["size_reduction"] > 2


def test_gate_accepts_then_refuses_and_champion_loads_fresh(
        pipeline: tuple[Path, dict[str, str]]) -> None:
    root, env = pipeline
    first = _read(root / "reports/evaluate/registry.json")
    assert first["promote"] is True and first["version"] == "1", first

    write_params(root, {**SETTINGS, "registry.gate.min_accuracy": 0.999})
    run_cli(root, "evaluate", env=env)
    second = _read(root / "reports/evaluate/registry.json")
    assert second["promote"] is False and second["version"] == "2"
    assert any(r.startswith("FAIL") and "min_accuracy" in r for r in second["reasons"])
    assert second["previous_champion"] == "1"

    script = textwrap.dedent("""
        import json, sys
        import mlflow, numpy as np, torch
        from mlflow.tracking import MlflowClient
        alias = MlflowClient().get_model_version_by_alias
        assert str(alias("refinery-student-int8", "champion").version) == "1"
        assert str(alias("refinery-student-int8", "candidate").version) == "2"
        model = mlflow.pyfunc.load_model("models:/refinery-student-int8@champion")
        test = torch.load("data/prepared/test.pt", weights_only=True)
        probs = model.predict((test["images"].float() / 255).numpy())
        accuracy = float((probs.argmax(1) == test["labels"].numpy()).mean())
        print(json.dumps({"accuracy": accuracy, "shape": list(probs.shape),
                          "refinery_loaded": any(m.startswith("refinery") for m in sys.modules)}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                            text=True, timeout=300, env={**_clean_env(), **env})
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    registered = _read(root / "metrics/evaluate.json")["student_int8"]["accuracy"]
    assert out["accuracy"] == pytest.approx(registered, abs=0.03)
    assert out["refinery_loaded"] is False


def _clean_env() -> dict[str, str]:
    """The test's environment without PYTHONPATH pointing at the project's sources."""
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
