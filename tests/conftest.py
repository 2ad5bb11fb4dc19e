"""Shared fixtures: an isolated MLflow store per test session, repo paths, shared data."""

from __future__ import annotations

import os
from pathlib import Path

# Under xdist, one core's worth of intra-op threads per worker, for the worker and every
# process it starts (stages, DVC, the session's pipeline run): torch's default, a thread per
# core in *every* process, oversubscribes the cores and OpenMP's spin-waiting burns them.
# Measured on the 2-core box, two `refinery evaluate` at once: 44.6 s with the default,
# 29.3 s with one thread each. Set before anything here imports torch. (The main process's
# environment is the workers' too, so only a worker can set this.)
_workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
if _workers:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(_workers)))

import pytest  # noqa: E402  (after the thread count)
from pipeline_run import (  # noqa: E402, F401  (session fixtures for every module)
    BUILD_TIMEOUT_S,
    pipeline_run,
    start_build,
    stop_build,
)
from servers import dvc_cache, mlflow_server, prefect_server  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
SHARED_CIFAR_SHA256 = "a20f75dab73b9c5c6f54e35c84da477e385f34a4615399fdbaef48b0e1e1c437"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.hookimpl(trylast=True)  # after -k/-m have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that read the session's pipeline run go last, the longest of them first, and
    the run starts building now in the background: the other tests run meanwhile."""
    reads = [item for item in items if "pipeline_run" in getattr(item, "fixturenames", ())]
    if not reads or config.option.collectonly:
        return
    start_build(config)
    # The first reader may wait for the build: its set-up gets that long on top.
    for item in reads:
        limit = float(config.getini("timeout") or 0)
        if limit and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit + BUILD_TIMEOUT_S))
    chosen = set(reads)
    items[:] = ([item for item in items if item not in chosen]
                + sorted(reads, key=lambda item: item.get_closest_marker("longest") is None))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the main process: the session's end
        stop_build(session.config)


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
