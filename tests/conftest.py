"""Shared fixtures: an isolated MLflow store per test session, repo paths, shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pipeline_run import pipeline_run  # noqa: F401  (session fixtures for every module)
from servers import dvc_cache, mlflow_server, prefect_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
SHARED_CIFAR_SHA256 = "a20f75dab73b9c5c6f54e35c84da477e385f34a4615399fdbaef48b0e1e1c437"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(scope="session", autouse=True)
def _isolated_mlflow(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never write to the repo's own mlflow/ store."""
    store = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def shared_cifar() -> Path:
    if not SHARED_CIFAR.exists():
        pytest.skip(f"shared CIFAR-10 archive not found at {SHARED_CIFAR}")
    return SHARED_CIFAR


@pytest.fixture
def loopback_server(monkeypatch: pytest.MonkeyPatch):
    """A real HTTP server on 127.0.0.1 with scriptable faults (see ``tests/loopback.py``)."""
    from loopback import LoopbackServer

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a CI proxy must not see loopback
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with LoopbackServer() as server:
        yield server
