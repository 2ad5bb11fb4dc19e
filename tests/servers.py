"""Real servers and throwaway repositories for the orchestration tests.

``mlflow server`` and ``prefect server start`` run as real processes on free
loopback ports, each in its own process group (so teardown kills the
workers they spawn too), with their health endpoints polled until they
answer. Pipelines run in a copy of the working tree made into its own git
repository, so ``dvc repro``/``dvc exp run`` never touch the real checkout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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
    """A fresh ``PREFECT_HOME`` for this test session (each xdist worker its own, since a
    worker inherits the controller's environment), before anything imports prefect."""
    owner = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if os.environ.get("REFINERY_TEST_PREFECT_HOME_OWNER") != owner:
        home = tempfile.mkdtemp(prefix=f"refinery-prefect-home-{owner}-")
        os.environ["REFINERY_TEST_PREFECT_HOME_OWNER"] = owner
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


class PostgresCluster:
    """A real PostgreSQL cluster of its own (``initdb`` + ``pg_ctl``) on a loopback port,
    password-authenticated over TCP like the team's database server.

    PostgreSQL refuses to run as root; as root, its commands run as the ``postgres``
    user that Debian's package creates (``.ci/run`` installs it).
    """

    PASSWORD = "refinery-tests-db"

    def __init__(self) -> None:
        # Not under pytest's temp folder: that is private to the user running the tests
        # (mode 0700), and the cluster's owner must reach its directory.
        self.root = Path(tempfile.mkdtemp(prefix="refinery-postgres-"))
        self.data = self.root / "data"
        self.port = free_port()

    @classmethod
    def attach(cls, root: Path, port: int) -> PostgresCluster:
        """The cluster another process started (and will stop)."""
        cluster = cls.__new__(cls)
        cluster.root, cluster.data, cluster.port = root, root / "data", port
        return cluster

    @staticmethod
    def _bin(tool: str) -> str:
        found = shutil.which(tool) or next(iter(sorted(
            Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), reverse=True)), None)
        if found is None:
            raise RuntimeError(f"PostgreSQL's {tool} is not installed (Debian: apt-get install "
                               "postgresql; .ci/run does it)")
        return str(found)

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def start(self) -> PostgresCluster:
        secret = self.root / "pwfile"
        secret.write_text(self.PASSWORD + "\n")
        if os.geteuid() == 0:
            for path in (self.root, secret):
                shutil.chown(path, "postgres", "postgres")
        run(self._as_owner([self._bin("initdb"), "-D", str(self.data), "-U", "postgres",
                            "--pwfile", str(secret), "--auth-host", "scram-sha-256",
                            "--auth-local", "peer", "-E", "UTF8", "--no-sync"]), self.root)
        run(self._as_owner([self._bin("pg_ctl"), "-D", str(self.data), "-l",
                            str(self.root / "postgres.log"), "-w", "-t", "120", "-o",
                            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off", "start"]),
            self.root)
        return self

    def create_database(self, name: str) -> str:
        self.sql(f"CREATE DATABASE {name}")
        return self.uri(name)

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser, over TCP with the password."""
        env = tool_env({"PGPASSWORD": self.PASSWORD})
        return run([self._bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                    "-d", database, "-tA", "-v", "ON_ERROR_STOP=1", "-c", statement],
                   self.root, env).stdout.strip()

    def uri(self, database: str) -> str:
        return f"postgresql://postgres:{self.PASSWORD}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        subprocess.run(self._as_owner([self._bin("pg_ctl"), "-D", str(self.data), "-m", "fast",
                                       "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class TeamAuth:
    """The basic-auth set-up of the team server: the admin (password from a file, as
    README says) and the users the tests sign in as."""

    admin_password_file: Path
    database_uri: str
    users: Mapping[str, str]  # username -> password (created by the admin after start)

    ADMIN = "admin"

    @property
    def admin_password(self) -> str:
        return self.admin_password_file.read_text().strip()

    def server_env(self) -> dict[str, str]:
        return {"MLFLOW_AUTH_DATABASE_URI": self.database_uri,
                "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(self.admin_password_file)}

    def client_env(self, user: str) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.users[user]}


class MlflowServer(ServerProcess):
    """The team server script (``mlflow/server.sh``).

    By default with a sqlite backend, on loopback without authentication; with
    ``backend`` (a PostgreSQL URI) and ``auth``, the team's set-up: same script,
    same flags, the same code path as production.
    """

    def __init__(self, workdir: Path, port: int | None = None, backend: str | None = None,
                 auth: TeamAuth | None = None, database: PostgresCluster | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.auth = auth
        self.database = database  # the PostgreSQL cluster behind ``backend``, if any
        workdir.mkdir(parents=True, exist_ok=True)
        env = tool_env({
            "MLFLOW_BACKEND_STORE_URI": backend or f"sqlite:///{workdir / 'mlflow.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": str(workdir / "artifacts"),
            "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(self.port), "MLFLOW_WORKERS": "1",
            **(auth.server_env() if auth else {"MLFLOW_AUTH": "none"}),
        })
        super().__init__("mlflow server", ["bash", str(REPO / "mlflow" / "server.sh")],
                         f"{self.uri}/health", env, workdir / "server.log")

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        super().start()
        if self.auth is not None:
            admin = (TeamAuth.ADMIN, self.auth.admin_password)
            for user, password in self.auth.users.items():
                response = requests.post(f"{self.uri}/api/2.0/mlflow/users/create", timeout=60,
                                         json={"username": user, "password": password},
                                         auth=admin)
                if response.status_code != 200 and "already exists" not in response.text:
                    raise RuntimeError(f"could not create MLflow user {user}: {response.text}")
        return self

    @contextlib.contextmanager
    def browser(self, user: str = "viewer") -> Iterator[Callable[[str], str]]:
        """UI addresses for a browser: signed in as ``user`` when the server wants it
        (through :class:`browser.SignedInProxy`), on MLflow's training view."""
        import browser

        def url(base: str) -> Callable[[str], str]:
            def page(fragment: str) -> str:
                separator = "&" if "?" in fragment else "?"
                return (f"{base}/#/{fragment.lstrip('/')}"
                        f"{separator}workflowType=machine_learning")
            return page

        if self.auth is None:
            yield url(self.uri)
            return
        with browser.SignedInProxy(self.uri, user, self.auth.users[user]) as proxy:
            yield url(proxy.uri)

    def client(self) -> Any:
        """A client signed in as the process environment says (the tests: the pipeline's
        user, see :func:`mlflow_server`)."""
        from mlflow.tracking import MlflowClient

        # The registry too: MLflow's global registry URI (a stage run in this process
        # points it at its own server) must not redirect this server's client.
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


#: What a failing server service (the scheduler, above all) writes to the server log.
SERVICE_ERROR = re.compile(r"Traceback \(most recent call last\)|\| ERROR +\||"
                           r"InvalidRequestError|Unexpected error in: ")


class PrefectServer(ServerProcess):
    """``prefect server start`` on loopback with its own ``PREFECT_HOME`` (sqlite).

    ``scheduler``: off by default (a 02:00 nightly run must not join the tests);
    on, it loops every few seconds so a schedule's runs appear within a test.
    Protected as README's team server is (``PREFECT_SERVER_API_AUTH_STRING``):
    every client here, workers and flows included, sends :attr:`AUTH`.
    """

    AUTH = "refinery:prefect-tests-secret"

    def __init__(self, home: Path, scheduler: bool = False, port: int | None = None) -> None:
        self.port = port or free_port()
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
                        "PREFECT_SERVER_API_AUTH_STRING": self.AUTH,
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
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home),
                "PREFECT_API_AUTH_STRING": self.AUTH}

    def api(self, method: str, path: str, body: Any = None, attempts: int = 6) -> Any:
        """A REST call; a busy sqlite-backed server may answer 5xx ("database is locked")
        under load, so those (and dropped connections) are retried with backoff."""
        for attempt in range(attempts):
            try:
                response = requests.request(method, f"{self.api_url}{path}", json=body,
                                            timeout=60, auth=tuple(self.AUTH.split(":", 1)))
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


#: The team server's users: the pipeline's (edits what it creates) and a reader.
PIPELINE_USER, VIEWER = "pipeline", "viewer"
TEAM_USERS = {PIPELINE_USER: "pipeline-secret", VIEWER: "viewer-secret"}


def start_team_mlflow(root: Path) -> MlflowServer:
    """The team set-up of ``mlflow/README.md``: PostgreSQL for runs and registry, a second
    PostgreSQL database for users, basic-auth with :data:`TEAM_USERS`, artifacts proxied
    to a folder. Stop it with :func:`stop_team_mlflow`."""
    database = PostgresCluster().start()
    try:
        secret = root / "admin-password"
        root.mkdir(parents=True, exist_ok=True)
        secret.write_text("refinery-tests-admin\n")
        secret.chmod(0o600)
        auth = TeamAuth(secret, database.create_database("mlflow_auth"), TEAM_USERS)
        return MlflowServer(root, backend=database.create_database("mlflow"), auth=auth,
                            database=database).start()
    except BaseException:
        database.stop()
        raise


def stop_team_mlflow(server: MlflowServer) -> None:
    try:
        server.stop()
    finally:
        if server.database is not None:
            server.database.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow server for the session (each xdist worker its own), shared by every
    module that imports this fixture: the team set-up (:func:`start_team_mlflow`). The test
    process and every stage it starts sign in as the pipeline's user."""
    if "mlflow" in _SHARED:
        yield _SHARED["mlflow"]  # type: ignore[misc]
        return
    with signed_in(PIPELINE_USER):
        server = start_team_mlflow(tmp_path_factory.mktemp("mlflow-server"))
        _SHARED["mlflow"] = server
        try:
            yield server
        finally:
            _SHARED.pop("mlflow", None)
            stop_team_mlflow(server)


@contextlib.contextmanager
def signed_in(user: str) -> Iterator[None]:
    """This process (and what it starts) signs in to the team servers as ``user``."""
    env = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": TEAM_USERS[user]}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def exp_show(ws: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json``: experiment name -> its ``data`` (params, metrics)."""
    out = run([str(BIN / "dvc"), "exp", "show", "--json"], ws, env).stdout
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict):
                found[node["name"]] = node["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(out))
    return found
