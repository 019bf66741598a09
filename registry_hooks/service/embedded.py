"""`tunelens server`: a real MLflow tracking server plus the hook service, in one command.

The data dir holds mlflow.db (unless another backend is given), artifacts/, and the Fernet key
MLflow encrypts webhook secrets with (MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY). The key must stay the
same across restarts and across the server's worker processes, or stored webhooks cannot be
decrypted. Loopback webhook delivery is enabled for this embedded server only (its environment),
since its receiver listens on 127.0.0.1.

MLflow and everything it spawns run under `supervisor`, which ends them all when this process
ends, however it ends. `PID_FILE` in the data dir records this server, its supervisor and its
worker id; a start on a data dir refuses to run beside a live server there, stops whatever a
killed run left behind (found by the data dir in its environment), and lets the new worker take
over at once the versions the dead worker held leases on, instead of waiting for them to expire.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tunelens.errors import TunelensError
from tunelens.settings import Settings

import psutil

from .scope import EVERYTHING, SCOPE_ENV, Scope, with_default_models
from .service import HookService
from .supervisor import MARKER_ENV, end_processes, stop_leftovers

log = logging.getLogger(__name__)

KEY_FILE = "webhook-encryption.key"
PID_FILE = "tunelens-server.json"


def stable_encryption_key(data_dir: Path) -> str:
    """The data dir's Fernet key, created (mode 0600) on first use."""
    from cryptography.fernet import Fernet

    path = data_dir / KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    key = Fernet.generate_key().decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _started_at(pid: int) -> float | None:
    """The process's start time (pid + start time names one process; a pid alone is reused)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(pid: int | None, started: float | None) -> psutil.Process | None:
    """The process `pid` if it still runs and is the one that started at `started`."""
    if not pid or started is None:
        return None
    now_started = _started_at(pid)
    if now_started is None or abs(now_started - started) > 0.05:
        return None
    return psutil.Process(pid)


def _wait_port_free(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _port_free(host, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)
    return True


class EmbeddedServer:
    """MLflow server subprocess + HookService; run() blocks until Ctrl-C or SIGTERM."""

    def __init__(self, config: Settings, *, host: str | None = None, port: int | None = None,
                 data_dir: str | os.PathLike | None = None, backend_store_uri: str | None = None):
        server = config.server
        # Its own registry: every model is in scope unless the user narrowed hooks.models.
        self.config = config = with_default_models(config, EVERYTHING)
        self.host = host or server.host
        self.port = int(port or server.port)
        self.data_dir = Path(data_dir or server.data_dir).expanduser().resolve()
        self.backend_store_uri = (backend_store_uri or server.backend_store_uri
                                  or f"sqlite:///{self.data_dir / 'mlflow.db'}")
        self.process: subprocess.Popen | None = None
        self.service: HookService | None = None
        # Worker ids of killed runs on this data dir -> when found dead (their leases are void).
        self.dead_workers: dict[str, float] = {}
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        registry_uri = []
        if self.config.server.registry_store_plugin:
            registry_uri = ["--registry-store-uri", "tunelens+" + self.backend_store_uri]
        return [sys.executable, "-m", "tunelens.registry_hooks.service.supervisor", str(os.getpid()),
                "--",
                sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port",
                str(self.port), "--workers", str(self.config.server.workers),
                "--backend-store-uri", self.backend_store_uri, *registry_uri,
                "--artifacts-destination", str(self.data_dir / "artifacts")]

    def environment(self) -> dict[str, str]:
        return {**os.environ,
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": stable_encryption_key(self.data_dir),
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                MARKER_ENV: str(self.data_dir),
                SCOPE_ENV: Scope.from_config(self.config).to_json()}

    @property
    def pid_file(self) -> Path:
        return self.data_dir / PID_FILE

    def _write_pid_file(self) -> None:
        record = {"pid": os.getpid(), "started": _started_at(os.getpid()),
                  "supervisor": self.process.pid, "supervisor_started": _started_at(self.process.pid),
                  "worker": self.service.worker.owner if self.service else None,
                  "dead_workers": self.dead_workers}
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.pid_file)

    def _clear_earlier_run(self) -> bool:
        """Refuse a live server on this data dir, stop what a killed one left, and note its
        worker as dead; whether an earlier run was found."""
        try:
            record = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        running = _alive(record.get("pid"), record.get("started"))
        if running is not None and running.pid != os.getpid():
            raise TunelensError(f"a tunelens server (pid {running.pid}) already runs on "
                                f"{self.data_dir}; stop it first, or pick another --data-dir")
        supervisor = _alive(record.get("supervisor"), record.get("supervisor_started"))
        if supervisor is not None:
            log.info("stopping the MLflow server an earlier run left (supervisor pid %d)",
                     supervisor.pid)
            end_processes([supervisor])
        stopped = stop_leftovers(str(self.data_dir))
        if stopped:
            log.info("stopped %d process(es) an earlier, killed run left behind: %s",
                     len(stopped), ", ".join(map(str, stopped)))
        # A dead worker's leases all expire within lease_seconds of its death, which came before
        # now: remember it (across further restarts) only that long.
        now, lease = time.time(), float(self.config.hooks.lease_seconds)
        dead = record.get("dead_workers") if isinstance(record.get("dead_workers"), dict) else {}
        self.dead_workers = {owner: float(since) for owner, since in dead.items()
                             if now - float(since) < lease}
        if record.get("worker"):
            self.dead_workers[str(record["worker"])] = now
        if record:
            self.pid_file.unlink(missing_ok=True)
        return bool(record or stopped)

    def start(self, timeout: float = 300) -> "EmbeddedServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        earlier_run = self._clear_earlier_run()
        # Every child of this process carries the mark too (the analysis child, an evaluation's
        # vLLM engine), so a later start finds whatever of them outlived a kill.
        os.environ[MARKER_ENV] = str(self.data_dir)
        # A port the killed run held is released a moment after its processes end.
        if not _wait_port_free(self.host, self.port, 10 if earlier_run else 0):
            raise TunelensError(f"port {self.port} on {self.host} is in use; pick another with "
                                f"--port")
        log_file = open(self.data_dir / "mlflow-server.log", "ab")
        self.process = subprocess.Popen(self.command(), env=self.environment(), cwd=self.data_dir,
                                        stdout=log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log_file.close()
        self._write_pid_file()
        self._wait_healthy(timeout)
        self.service = HookService(
            self.url, self.config, dead_workers=frozenset(self.dead_workers),
            guard_aliases=not self.config.server.registry_store_plugin).start()
        self._write_pid_file()
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TunelensError(f"the MLflow server exited ({self.process.returncode}); see "
                                    f"{self.data_dir / 'mlflow-server.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TunelensError(f"the MLflow server did not answer within {timeout:.0f} s; see "
                            f"{self.data_dir / 'mlflow-server.log'}")

    def stop(self) -> None:
        """Stop the hook service, then the MLflow server (its supervisor ends the whole tree)."""
        if self.service is not None:
            log.info("stopping the hook service")
            self.service.stop()
            self.service = None
        if self.process is not None and self.process.poll() is None:
            log.info("stopping the MLflow server (pid %d)", self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            try:  # the supervisor gives the tree 10 s, then kills it
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("the MLflow server did not stop in 30 s; killing its process group")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.process is not None:
            self.pid_file.unlink(missing_ok=True)
        self.process = None
        self._stopped.set()

    def serve_until_stopped(self) -> None:
        """Block until Ctrl-C/SIGTERM or the MLflow server dies (then raise); the caller stops."""
        def on_signal(signum, _frame):
            self._stopped.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stopped.wait(1):
                if self.process.poll() is not None:
                    raise TunelensError(f"the MLflow server exited ({self.process.returncode}); "
                                        f"see {self.data_dir / 'mlflow-server.log'}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self) -> int:
        """Start, then serve until Ctrl-C/SIGTERM (or the MLflow server dies); stop cleanly."""
        try:
            self.start()
            print(f"tunelens server: MLflow UI and API on {self.url}; webhooks on "
                  f"{self.service.webhook_url}; data in {self.data_dir}", file=sys.stderr,
                  flush=True)
            self.serve_until_stopped()
        finally:
            self.stop()
        print("tunelens server: stopped", file=sys.stderr, flush=True)
        return 0
