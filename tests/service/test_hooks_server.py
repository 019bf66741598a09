"""`tunelens server` (embedded MLflow + hooks) and the registry-store plugin, as real processes."""
from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import mlflow
import requests
from mlflow import MlflowClient

import psutil
import yaml

from support.hooks_support import (REPO, HooksProcess, analysis_runs, register, wait_status,
                           write_config)
from support.mlflow_server import MlflowServer, free_port, postgres_database
from tunelens.registry_hooks.service.embedded import KEY_FILE, PID_FILE
from tunelens.registry_hooks.service.state import STATUS
from tunelens.registry_hooks.service.supervisor import MARKER_ENV

# mlflow.transformers stores a PEFT adapter alone (what tunelens.log_adapter needs) from 3.12 on.
ADAPTER_ONLY_LOGGING = "base_model_path" in inspect.signature(
    mlflow.transformers.log_model).parameters


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.RequestException:
        return False


class ServerProcess:
    def __init__(self, data_dir, config, log_path, *, port=None, jobs=False):
        self.port = port or free_port()
        self.data_dir = data_dir
        self.log_path = log_path
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(jobs).lower(),
               "PYTHONUNBUFFERED": "1"}
        env.pop("TUNELENS_WEBHOOK_SECRET", None)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tunelens.plugin.cli", "--config", str(config), "server",
                 "--port", str(self.port), "--data-dir", str(data_dir)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 360
        while "MLflow UI and API on" not in log_path.read_text(errors="replace"):
            assert self.process.poll() is None and time.monotonic() < deadline, self.log_tail()
            time.sleep(0.2)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self):
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


@pytest.mark.skipif(not ADAPTER_ONLY_LOGGING, reason="this MLflow cannot log an adapter alone "
                    "(tests/plugin/test_mlflow_range.py checks log_adapter says so)")
def test_embedded_server_analyses_logged_adapters_and_restarts_cleanly(tmp_path, llama_base,
                                                                        llama_adapter):
    import tunelens

    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "conf.yaml", poll_interval=3600)
    server = ServerProcess(data_dir, config, tmp_path / "server.log")
    try:
        client = MlflowClient(server.url)
        hooks = [h for h in client.list_webhooks() if h.name == "tunelens-analysis"]
        assert len(hooks) == 1 and hooks[0].url.startswith("http://127.0.0.1:")
        key = (data_dir / KEY_FILE).read_text()
        assert oct((data_dir / KEY_FILE).stat().st_mode & 0o777) == "0o600"

        logged = tunelens.log_adapter(llama_adapter, base=llama_base,
                                      registered_model_name="served", tracking_uri=server.url)
        tags = wait_status(client, "served", str(logged.version))
        assert tags[STATUS] == "done", server.log_tail()
        run = client.get_run(tags["tunelens.analysis.run_id"])
        assert run.data.params["base_model_path"] == str(llama_base)
        assert run.data.params["base_model_source"] == "MLmodel local_base_model_path"
        # Lineage: the machine and the libraries, and the version's LoggedModel as the run's input.
        assert run.data.tags["tunelens.machine.cpu_count"] == str(len(os.sched_getaffinity(0)))
        assert run.data.tags["tunelens.library.mlflow"] == mlflow.__version__
        model_id = logged.model_uri.removeprefix("models:/")
        assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
        assert client.get_logged_model(model_id).name == "model"
    finally:
        assert server.terminate() == 0, server.log_tail()
    assert "tunelens server: stopped" in server.log_tail()
    assert not _answers(server.url)  # the MLflow child went with it

    server = ServerProcess(data_dir, config, tmp_path / "server2.log")
    try:
        client = MlflowClient(server.url)
        assert (data_dir / KEY_FILE).read_text() == key
        hooks = [h for h in client.list_webhooks() if h.name == "tunelens-analysis"]
        assert len(hooks) == 1 and hooks[0].url.endswith("/webhook")
        version = register(client, "served", llama_adapter)  # a webhook after the restart
        assert wait_status(client, "served", version)[STATUS] == "done", server.log_tail()
        assert wait_status(client, "served", str(logged.version))[STATUS] == "done"
    finally:
        assert server.terminate() == 0, server.log_tail()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_registry_store_plugin_enqueues_inside_the_request(backend, tmp_path, llama_adapter,
                                                          request):
    with_db = postgres_database("tunelens_plugin") if backend == "postgresql" else None
    if with_db:
        request.getfixturevalue("postgres_database_uri")
        uri = with_db.__enter__()
        registry = "tunelens+postgresql://" + uri.split("://", 1)[1]
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        registry = "tunelens+" + uri
    try:
        with MlflowServer(tmp_path / "mlflow", uri, args=["--registry-store-uri", registry]) as srv:
            client = MlflowClient(srv.url)
            # outside `tunelens server` only opted-in models are in scope (hooks.models_tag)
            client.create_registered_model("plugged", tags={"tunelens.enabled": "true"})
            version = register(client, "plugged", llama_adapter)
            # queued in the same insert as the version, with no hook service running at all
            assert client.get_model_version("plugged", version).tags[STATUS] == "queued"
            outside = register(client, "not-opted-in", llama_adapter)
            assert STATUS not in client.get_model_version("not-opted-in", outside).tags
            hooks = HooksProcess(srv.url, write_config(tmp_path / "conf.yaml"),
                                 tmp_path / "hooks.log", secret="x", webhook=False)
            try:
                assert wait_status(client, "plugged", version)[STATUS] == "done", hooks.log_tail()
            finally:
                assert hooks.stop() == 0
    finally:
        if with_db:
            with_db.__exit__(None, None, None)


def _processes_of(data_dir) -> list[psutil.Process]:
    """This user's processes started for the server on `data_dir` (they carry it in their env)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER_ENV) == str(data_dir.resolve()):
                found.append(process)
        except psutil.Error:
            continue
    return [p for p in found if p.status() != psutil.STATUS_ZOMBIE]


def _kill_mid_analysis(server: ServerProcess, client: MlflowClient, name: str, versions,
                       *, with_supervisor: bool = False) -> None:
    """SIGKILL the whole `tunelens server` (and its supervisor too) while a version is analysed."""
    deadline = time.monotonic() + 240
    while not any(client.get_model_version(name, v).tags.get(STATUS) == "running"
                  for v in versions):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.1)
    if with_supervisor:  # as an OOM kill of both would (the supervisor first, or it would still
        # end the tree on its parent's death): MLflow is orphaned, holding the port
        os.kill(json.loads((server.data_dir / PID_FILE).read_text())["supervisor"], signal.SIGKILL)
    server.kill()

def test_sigkilled_server_leaves_nothing_and_restarts_to_finish_every_version(
        tmp_path, llama_adapter):
    data_dir = tmp_path / "data"
    # Leases far longer than the test: versions finish only if the restart takes over the dead
    # worker's leases at once.
    config = write_config(tmp_path / "conf.yaml", lease_seconds=3600, poll_interval=2)
    server = ServerProcess(data_dir, config, tmp_path / "server1.log", jobs=True)
    port = server.port
    client = MlflowClient(server.url)
    versions = [register(client, "killed", llama_adapter) for _ in range(3)]
    _kill_mid_analysis(server, client, "killed", versions)
    # the parent-death path: MLflow, its workers, job runner and the analysis child all end
    deadline = time.monotonic() + 30
    while _processes_of(data_dir) or _answers(server.url):
        assert time.monotonic() < deadline, [p.cmdline() for p in _processes_of(data_dir)]
        time.sleep(0.2)

    server = ServerProcess(data_dir, config, tmp_path / "server2.log", port=port, jobs=True)
    versions += [register(client, "killed", llama_adapter) for _ in range(2)]
    _kill_mid_analysis(server, client, "killed", versions, with_supervisor=True)
    time.sleep(2)
    assert _processes_of(data_dir)  # the orphans a double kill leaves: the next start's job

    server = ServerProcess(data_dir, config, tmp_path / "server3.log", port=port, jobs=True)
    try:
        assert "stopped" in server.log_tail() and "earlier, killed run" in server.log_tail()
        for version in versions:
            tags = wait_status(client, "killed", version)
            assert tags[STATUS] == "done", (version, tags, server.log_tail())
            assert len(analysis_runs(client, "killed", version)) == 1, version
    finally:
        assert server.terminate() == 0, server.log_tail()
    deadline = time.monotonic() + 15  # the server has exited; its children are exiting with it
    while _processes_of(data_dir):
        assert time.monotonic() < deadline, [p.cmdline() for p in _processes_of(data_dir)]
        time.sleep(0.2)
    assert not (data_dir / PID_FILE).exists()


def test_embedded_server_hands_its_scope_to_the_registry_store_plugin(tmp_path, llama_adapter):
    config = tmp_path / "conf.yaml"
    config.write_text(yaml.safe_dump({"hooks": {"models": ["team-*"], "poll_interval": 2},
                                      "server": {"registry_store_plugin": True}}))
    server = ServerProcess(tmp_path / "data", config, tmp_path / "server.log")
    try:
        client = MlflowClient(server.url)
        inside = register(client, "team-chat", llama_adapter)
        outside = register(client, "other-chat", llama_adapter)
        assert wait_status(client, "team-chat", inside)[STATUS] == "done", server.log_tail()
        time.sleep(3)  # another scan
        tags = client.get_model_version("other-chat", outside).tags
        assert not [k for k in tags if k.startswith("tunelens.")], tags
    finally:
        assert server.terminate() == 0, server.log_tail()


def test_tunelens_server_holds_production_from_the_client_and_the_rest_api(tmp_path):
    """A REJECTed, a stale-PROMOTE and a never-evaluated version cannot take `production` on a
    real `tunelens server`, through MlflowClient or the REST API; a covering PROMOTE can."""
    from mlflow.exceptions import MlflowException

    from support.verdicts import CURRENT, new_versions, sign_verdict
    from tunelens.registry.promotion import Gatekeeper, promote

    server = ServerProcess(tmp_path / "data", write_config(tmp_path / "conf.yaml",
                                                           poll_interval=3600),
                           tmp_path / "server.log")
    try:
        client = MlflowClient(server.url)
        client.create_registered_model("held")
        v1, rejected, never, stale, better, best = new_versions(client, "held",
                                                                tmp_path / "files", 6)
        sign_verdict(client, "held", v1, "PROMOTE", holder=CURRENT)
        promote(client, Gatekeeper.from_config(None), "held", v1)
        sign_verdict(client, "held", rejected, "REJECT", holder=CURRENT)
        sign_verdict(client, "held", stale, "PROMOTE", holder="none")
        sign_verdict(client, "held", better, "PROMOTE", holder=CURRENT)

        def rest(version):
            return requests.post(f"{server.url}/api/2.0/mlflow/registered-models/alias",
                                 json={"name": "held", "alias": "production",
                                       "version": version}, timeout=30)

        for version, says in ((rejected, "its verdict is REJECT, not PROMOTE"),
                              (never, "it was never evaluated"),
                              (stale, f"its verdict is stale: it was evaluated against no version "
                                      f"holding it but v{v1} holds production now")):
            with pytest.raises(MlflowException) as refused:
                client.set_registered_model_alias("held", "production", version)
            assert says in refused.value.message and "tunelens promote" in refused.value.message
            answer = rest(version)
            assert answer.status_code == 403 and says in answer.json()["message"], answer.text
            assert client.get_registered_model("held").aliases == {"production": v1}

        client.set_registered_model_alias("held", "production", better)  # covers v1: allowed
        sign_verdict(client, "held", best, "PROMOTE", holder=CURRENT)
        assert rest(best).status_code == 200
        assert client.get_registered_model("held").aliases == {"production": best}
    finally:
        assert server.terminate() == 0, server.log_tail()
