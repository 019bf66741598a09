"""`tunelens server`: a real MLflow tracking server plus the hook service, in one command.

The data dir holds mlflow.db (unless another backend is given), artifacts/, and the Fernet key
MLflow encrypts webhook secrets with (MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY). The key must stay the
same across restarts and across the server's worker processes, or stored webhooks cannot be
decrypted. Loopback webhook delivery is enabled for this embedded server only (its environment),
since its receiver listens on 127.0.0.1.
"""
from __future__ import annotations

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

from .service import HookService

log = logging.getLogger(__name__)

KEY_FILE = "webhook-encryption.key"


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


class EmbeddedServer:
    """MLflow server subprocess + HookService; run() blocks until Ctrl-C or SIGTERM."""

    def __init__(self, config: dict, *, host: str | None = None, port: int | None = None,
                 data_dir: str | os.PathLike | None = None, backend_store_uri: str | None = None):
        server = config["server"]
        self.config = config
        self.host = host or server["host"]
        self.port = int(port or server["port"])
        self.data_dir = Path(data_dir or server["data_dir"]).expanduser().resolve()
        self.backend_store_uri = (backend_store_uri or server["backend_store_uri"]
                                  or f"sqlite:///{self.data_dir / 'mlflow.db'}")
        self.process: subprocess.Popen | None = None
        self.service: HookService | None = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        registry_uri = []
        if self.config["server"]["registry_store_plugin"]:
            registry_uri = ["--registry-store-uri", "tunelens+" + self.backend_store_uri]
        return [sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port",
                str(self.port), "--workers", str(self.config["server"]["workers"]),
                "--backend-store-uri", self.backend_store_uri, *registry_uri,
                "--artifacts-destination", str(self.data_dir / "artifacts")]

    def environment(self) -> dict[str, str]:
        return {**os.environ,
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": stable_encryption_key(self.data_dir),
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"}

    def start(self, timeout: float = 300) -> "EmbeddedServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not _port_free(self.host, self.port):
            raise TunelensError(f"port {self.port} on {self.host} is in use; pick another with "
                                f"--port")
        log_file = open(self.data_dir / "mlflow-server.log", "ab")
        self.process = subprocess.Popen(self.command(), env=self.environment(), cwd=self.data_dir,
                                        stdout=log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log_file.close()
        self._wait_healthy(timeout)
        self.service = HookService(self.url, self.config).start()
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
        """Stop the hook service, then the MLflow server's whole process group."""
        if self.service is not None:
            log.info("stopping the hook service")
            self.service.stop()
            self.service = None
        if self.process is not None and self.process.poll() is None:
            log.info("stopping the MLflow server (pid %d)", self.process.pid)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:  # uvicorn waits on open requests: do not hang
                log.warning("the MLflow server did not stop in 10 s; killing it")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
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
