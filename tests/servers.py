"""Real servers and throwaway repositories for the orchestration tests.

``mlflow server`` and ``prefect server start`` run as real processes on free
loopback ports, each in its own process group (so teardown kills the
workers they spawn too), with their health endpoints polled until they
answer. Pipelines run in a copy of the working tree made into its own git
repository, so ``dvc repro``/``dvc exp run`` never touch the real checkout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: Everything we start stays offline and quiet.
OFFLINE = {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GIT_PYTHON_REFRESH": "quiet",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "PYTHONUNBUFFERED": "1",
}


def isolate_prefect_home() -> None:
    """A fresh ``PREFECT_HOME`` for this test session, before anything imports prefect."""
    if "REFINERY_TEST_PREFECT_HOME" not in os.environ:
        home = tempfile.mkdtemp(prefix="refinery-prefect-home-")
        os.environ["REFINERY_TEST_PREFECT_HOME"] = home
        os.environ["PREFECT_HOME"] = home
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This interpreter's ``bin`` first on PATH (``dvc``, ``mlflow``, ``prefect``, ``python``)."""
    env = {**os.environ, **OFFLINE}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(extra or {})
    return env


class ServerProcess:
    """A server started as a real process; ``kill()`` simulates a crash, ``start()`` a restart."""

    def __init__(self, name: str, argv: list[str], health_url: str, env: Mapping[str, str],
                 log_path: Path, startup_timeout_s: float = 240) -> None:
        self.name = name
        self.argv = argv
        self.health_url = health_url
        self.env = dict(env)
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.health_url, timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {self.startup_timeout_s}s:\n"
                           + self.log_tail())

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group: the server vanishes mid-request, like a crash."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        self._wait_port_free()

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.proc is not None:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group

    def _wait_port_free(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                requests.get(self.health_url, timeout=1)
                time.sleep(0.3)
                continue
            return


class MlflowServer(ServerProcess):
    """The team server script (``mlflow/server.sh``) with a sqlite backend and a
    local artifact folder instead of PostgreSQL and S3: same flags, same code path."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        env = tool_env({
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{workdir / 'mlflow.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": str(workdir / "artifacts"),
            "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(self.port), "MLFLOW_WORKERS": "1",
        })
        super().__init__("mlflow server", ["bash", str(REPO / "mlflow" / "server.sh")],
                         f"{self.uri}/health", env, workdir / "server.log")

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


#: What a failing server service (the scheduler, above all) writes to the server log.
SERVICE_ERROR = re.compile(r"Traceback \(most recent call last\)|\| ERROR +\||"
                           r"InvalidRequestError|Unexpected error in: ")


class PrefectServer(ServerProcess):
    """``prefect server start`` on loopback with its own ``PREFECT_HOME`` (sqlite).

    ``scheduler``: off by default (a 02:00 nightly run must not join the tests);
    on, it loops every few seconds so a schedule's runs appear within a test.
    """

    def __init__(self, home: Path, scheduler: bool = False) -> None:
        self.port = free_port()
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                "--port", str(self.port), "--analytics-off"]
        # No automations, and patient sqlite waits: two shared cores under load make
        # writers queue.
        env = tool_env({"PREFECT_HOME": str(home),
                        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": str(scheduler).lower(),
                        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
                        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
                        "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
                        "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30"})
        super().__init__("prefect server", argv, f"{self.api_url}/health", env,
                         home / "server.log")

    def service_errors(self) -> list[str]:
        """Error lines of the server log (a crashing service logs there, nowhere else)."""
        lines = self.log_tail(chars=2_000_000).splitlines()
        return [line for line in lines if SERVICE_ERROR.search(line)]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def client_env(self) -> dict[str, str]:
        """Environment for CLI calls and workers talking to this server."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home)}

    def api(self, method: str, path: str, body: Any = None, attempts: int = 6) -> Any:
        """A REST call; a busy sqlite-backed server may answer 5xx ("database is locked")
        under load, so those (and dropped connections) are retried with backoff."""
        for attempt in range(attempts):
            try:
                response = requests.request(method, f"{self.api_url}{path}", json=body,
                                            timeout=60)
            except requests.ConnectionError:
                if attempt == attempts - 1:
                    raise
            else:
                if response.status_code < 500 or attempt == attempts - 1:
                    response.raise_for_status()
                    return response.json() if response.content else None
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")


class TcpProxy:
    """A loopback TCP forwarder: ``cut()`` is a network partition in front of a real
    server (connections dropped, new ones refused), ``restore()`` heals it."""

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.port = free_port()
        self._threading = threading
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


_SHARED: dict[str, ServerProcess] = {}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow server for the session, shared by every module that imports this fixture."""
    if "mlflow" in _SHARED:
        yield _SHARED["mlflow"]  # type: ignore[misc]
        return
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    _SHARED["mlflow"] = server
    try:
        yield server
    finally:
        _SHARED.pop("mlflow", None)
        server.stop()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One Prefect server for the session (scheduler off), shared like :func:`mlflow_server`."""
    if "prefect" in _SHARED:
        yield _SHARED["prefect"]  # type: ignore[misc]
        return
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home")).start()
    _SHARED["prefect"] = server
    try:
        yield server
    finally:
        _SHARED.pop("prefect", None)
        server.stop()


@pytest.fixture(scope="session")
def dvc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC cache shared by the session's workspaces: its run cache lets a stage that
    another test already ran with the same code, data and params be restored instead
    of recomputed, as a team's shared cache would."""
    return tmp_path_factory.getbasetemp() / "dvc-cache"


# ---------------------------------------------------------------------- workspaces


def run(argv: list[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 900,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure the assertion shows its output."""
    result = subprocess.run(argv, cwd=cwd, env=dict(env or tool_env()), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def _run_state(repo: Path) -> tuple[str, ...]:
    """What ``dvc repro`` writes: ``dvc.lock`` and every declared output. With
    ``core.autostage`` DVC stages these in git's index, so "in the index" alone would
    take a user's run along (CI once failed so: ``make pipeline``, then ``make test``)."""
    file = repo / "dvc.yaml"
    declared = yaml.safe_load(file.read_text()) if file.exists() else {}
    paths = ["dvc.lock"]
    for stage in (declared or {}).get("stages", {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return tuple(path.rstrip("/") for path in paths)


def tracked_files(repo: Path = REPO) -> list[str]:
    """What git tracks in ``repo`` (as in the working tree), and nothing else: not the run
    state a user's ``make pipeline`` leaves (``dvc.lock``, ``metrics/``, ``plots/``, models),
    even where DVC's autostage has put it in the index. A new source file needs ``git add``
    (``-N`` will do)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "-z"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")
    state = _run_state(repo)
    return [name for name in listed
            if name and (repo / name).is_file()
            and not any(name == out or name.startswith(out + "/") for out in state)]


def workspace_copy(dst: Path, cache: Path | None = None,
                   overrides: Mapping[str, Any] | None = None, source: Path = REPO) -> Path:
    """The tracked files of the working tree (:func:`tracked_files`) as a fresh git+DVC repo.

    ``overrides`` (dotted keys) are applied to its ``params.yaml`` and committed.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for name in tracked_files(source):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, dst / name)
    if overrides:
        from refinery.params import apply_overrides, parse_params

        raw = apply_overrides(yaml.safe_load((dst / "params.yaml").read_text()), dict(overrides))
        parse_params(raw)
        (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git = ["git", "-c", "user.name=refinery-tests", "-c", "user.email=tests@refinery.invalid",
           "-c", "commit.gpgsign=false"]
    run(["git", "init", "-q", "-b", "main"], dst)
    run([*git, "add", "-A"], dst)
    run([*git, "commit", "-q", "-m", "workspace snapshot"], dst)
    if cache is not None:
        run([str(BIN / "dvc"), "cache", "dir", "--local", str(cache)], dst)
    return dst


def workspace_env(workspace: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Stage processes import the copy's code, as they would in a real checkout."""
    env = tool_env(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(workspace / "src"), str(workspace)])
    env.pop("REFINERY_PIPELINE_ID", None)
    return env


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# ------------------------------------------------------------------ MLflow queries


def runs(client: Any, experiment: str = "refinery", query: str = "") -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], query, max_results=1000))


def parents(client: Any, experiment: str = "refinery") -> list[Any]:
    return runs(client, experiment, "tags.`refinery.role` = 'pipeline'")


def children(client: Any, parent_id: str, experiment: str = "refinery") -> dict[str, Any]:
    """Stage name -> child run of a parent."""
    found = runs(client, experiment, f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {run.data.tags["refinery.stage"]: run for run in found}
