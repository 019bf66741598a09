"""A real `mlflow server` subprocess for tests: loopback port, SQL backend, local artifacts.

    with MlflowServer(tmp_path) as server:               # sqlite under tmp_path
        client = MlflowClient(server.url)

    with postgres_database() as uri, MlflowServer(tmp_path, uri) as server: ...

The server runs in its own process group so stop()/kill() take uvicorn's workers with it. Webhook
deliveries need a stable Fernet key shared by the server's workers (else each worker has its own
random key and deliveries fail with InvalidToken); the helper always sets one, kept across restarts.
`allow_loopback_webhooks=True` lets the server deliver webhooks to 127.0.0.1 (tests only).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

POSTGRES_ADMIN_DSN = os.environ.get("TUNELENS_TEST_POSTGRES_DSN",
                                    "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


class MlflowServer:
    """One `mlflow server` process; start() waits until GET /health answers OK."""

    def __init__(self, root: Path, backend_store_uri: str | None = None, *,
                 env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                 port: int | None = None, workers: int = 1,
                 allow_loopback_webhooks: bool = False, python: str = sys.executable):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts_dir = self.root / "artifacts"
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workers = workers
        self.extra_args = list(args)
        self.webhook_key = fernet_key()
        self.env = {
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": self.webhook_key,
            # The huey job runner is a second process tree tests do not need.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # A test must see new webhooks at once, not after the 60 s cache.
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        }
        if allow_loopback_webhooks:
            self.env.update(MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
                            MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true")
        self.env.update(env or {})
        self.python = python
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [self.python, "-m", "mlflow", "server", "--host", self.host, "--port",
                str(self.port), "--workers", str(self.workers), "--backend-store-uri",
                self.backend_store_uri, "--artifacts-destination", str(self.artifacts_dir),
                *self.extra_args]

    def start(self, timeout: float = 240) -> "MlflowServer":
        if self.running:
            return self
        env = {**os.environ, **self.env}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), cwd=self.root, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; "
                                   f"log tail:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s; "
                           f"log tail:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the whole process group, SIGKILL it if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait(10)
        self._signal_group(signal.SIGKILL)  # stragglers (uvicorn workers) of a dead parent
        self.process = None

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def restart(self, timeout: float = 240) -> "MlflowServer":
        """Stop and start again on the same port, backend, artifacts and webhook key."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def postgres_available() -> bool:
    try:
        import psycopg2

        psycopg2.connect(POSTGRES_ADMIN_DSN, connect_timeout=3).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False


def require_postgres() -> None:
    """PostgreSQL for the calling test: started where this machine has it installed but stopped
    (as .ci/run does), the test skipped with the reason where the machine has none."""
    if postgres_available():
        return
    clusters = Path("/etc/postgresql")
    if shutil.which("pg_ctlcluster") and clusters.is_dir() and any(clusters.iterdir()):
        version = sorted(p.name for p in clusters.iterdir())[0]
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                       capture_output=True, timeout=120)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if postgres_available():
                return
            time.sleep(0.5)
        pytest.fail(f"PostgreSQL {version} is installed but did not start on 127.0.0.1:5432; "
                    f"see `pg_ctlcluster {version} main status`")
    pytest.skip("PostgreSQL is not installed on this machine (no server on 127.0.0.1:5432, no "
                "pg_ctlcluster); set TUNELENS_TEST_POSTGRES_DSN to use another server")


@contextlib.contextmanager
def postgres_database(prefix: str = "tunelens_test") -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432, dropped afterwards; yields its SQLAlchemy URI.
    Starts or skips as require_postgres() says."""
    import psycopg2

    require_postgres()

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(POSTGRES_ADMIN_DSN, connect_timeout=5)
    admin.autocommit = True
    params = admin.get_dsn_parameters()
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield (f"postgresql+psycopg2://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
               f"{params.get('port', '5432')}/{name}")
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
