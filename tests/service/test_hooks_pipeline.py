"""Registered versions are analysed by real `tunelens hooks` processes on sqlite and PostgreSQL.

Each backend gets its own MLflow server (the hook scan touches every version on a server).
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow import MlflowClient

from support.factories import make_lora_adapter
from support.hooks_support import HooksProcess, analysis_runs, register, wait_status, write_config
from support.mlflow_server import MlflowServer, postgres_database
from tunelens.registry_hooks.service.state import ERROR, LEASE, STATUS, Lease

SECRET = "pipeline-secret"


@pytest.fixture(scope="module")
def small_adapter(llama_base, tmp_path_factory):
    """r=2 on q_proj only: the cheapest real adapter, for the many-versions test."""
    return make_lora_adapter(llama_base, tmp_path_factory.mktemp("small-adapter"), r=2,
                             lora_alpha=4, target_modules=["q_proj"])


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path):
    if request.param == "sqlite":
        with MlflowServer(tmp_path / "mlflow", allow_loopback_webhooks=True, workers=2) as srv:
            yield srv
    else:
        request.getfixturevalue("postgres_database_uri")  # fails clearly if PostgreSQL is down
        with postgres_database("tunelens_hooks") as uri, \
                MlflowServer(tmp_path / "mlflow", uri, allow_loopback_webhooks=True,
                             workers=2) as srv:
            yield srv


def _hooks(server, tmp_path, name="hooks", **settings):
    config = write_config(tmp_path / f"{name}.yaml", **settings)
    return HooksProcess(server.url, config, tmp_path / f"{name}.log", secret=SECRET)


def test_versions_are_analysed_skipped_or_failed_and_many_at_once_lose_nothing(
        server, tmp_path, llama_adapter, small_adapter):
    client = MlflowClient(server.url)
    hooks = _hooks(server, tmp_path)
    second = None
    try:
        # A LoRA adapter, delivered by MLflow's own webhook: done, with everything in MLflow.
        version = register(client, "lora", llama_adapter)
        tags = wait_status(client, "lora", version)
        assert tags[STATUS] == "done", hooks.log_tail()
        run = client.get_run(tags["tunelens.analysis.run_id"])
        assert run.data.tags["tunelens.model_name"] == "lora"
        assert run.data.tags["tunelens.model_version"] == version
        assert int(tags["tunelens.trainable_params"]) == run.data.metrics["trainable_params"] > 0
        assert tags["tunelens.layers_modified"] == "2"
        assert tags["tunelens.top_layer"] in {"0", "1"}
        for size in ("mean_module_fro", "max_module_fro", "mean_layer_fro_sum",
                     "max_layer_fro_sum"):
            assert float(tags[f"tunelens.{size}"]) == pytest.approx(run.data.metrics[size],
                                                                    rel=1e-5)
        # Two layers of 7 modules each: the mean S_ℓ is 7 times the mean per module.
        assert float(tags["tunelens.mean_layer_fro_sum"]) == pytest.approx(
            7 * float(tags["tunelens.mean_module_fro"]), rel=1e-5)
        page = client.get_model_version("lora", version).description
        assert "per module (a fused projection counts once)" in page and "per-layer" in page
        assert run.data.params["r"] == "8" and float(run.data.params["lora_alpha"]) == 16
        steps = client.get_metric_history(run.info.run_id, "layer_fro_sum")
        assert sorted(m.step for m in steps) == [0, 1]
        files = {f.path for f in client.list_artifacts(run.info.run_id, "tunelens")}
        assert {"tunelens/analysis.json", "tunelens/report.html", "tunelens/modules.json"} <= files
        # report.html draws every chart itself (MLflow's artifact view renders it); PNG copies are
        # opt-in (analysis.png_charts).
        assert "tunelens/charts" not in files
        page = open(client.download_artifacts(run.info.run_id, "tunelens/report.html",
                                              str(tmp_path))).read()
        assert 'id="layer-chart"' in page and 'id="tunelens-data"' in page
        table = json.loads(open(client.download_artifacts(run.info.run_id,
                                                          "tunelens/modules.json",
                                                          str(tmp_path))).read())
        assert len(table["data"]) == 14  # 7 modules x 2 layers
        description = client.get_model_version("lora", version).description
        assert "### tunelens analysis" in description and run.info.run_id in description
        assert "tunelens/report.html" in description and ".png" not in description

        # Not a LoRA adapter: skipped with a reason.
        other = tmp_path / "not-lora"
        other.mkdir()
        (other / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
        tags = wait_status(client, "other", register(client, "other", other))
        assert tags[STATUS] == "skipped" and "IA3" in tags["tunelens.analysis.reason"]

        # A corrupt adapter: failed with one readable line; the service keeps serving.
        corrupt = tmp_path / "corrupt"
        shutil.copytree(llama_adapter, corrupt)
        (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
        tags = wait_status(client, "corrupt", register(client, "corrupt", corrupt))
        assert tags[STATUS] == "failed" and tags[ERROR] and "\n" not in tags[ERROR]
        assert "Traceback" not in tags[ERROR]
        assert server.healthy() and hooks.process.poll() is None

        # 20 versions registered at once, two hook processes: all done, one run each.
        second = _hooks(server, tmp_path, "hooks2")
        with ThreadPoolExecutor(8) as pool:
            versions = list(pool.map(lambda i: register(client, "many", small_adapter), range(20)))
        assert len(set(versions)) == 20
        for v in versions:
            assert wait_status(client, "many", v, timeout=300)[STATUS] == "done", hooks.log_tail()
        for v in versions:
            runs = analysis_runs(client, "many", v)
            assert len(runs) == 1, (v, [r.info.run_id for r in runs])
            assert runs[0].info.run_id == client.get_model_version("many", v).tags[
                "tunelens.analysis.run_id"]
    finally:
        codes = [hooks.stop()] + ([second.stop()] if second else [])
    assert codes == [0] * len(codes), hooks.log_tail()


def test_killed_worker_is_resumed_with_one_run(server, tmp_path, llama_adapter):
    client = MlflowClient(server.url)
    first = _hooks(server, tmp_path, "first", lease_seconds=5)
    version = register(client, "crash", llama_adapter)
    wait_status(client, "crash", version, timeout=120, statuses={"running"})
    first.kill()
    tags = client.get_model_version("crash", version).tags
    assert tags[STATUS] == "running", "the worker finished before it could be killed"
    assert Lease.parse(tags[LEASE]).attempt == 1

    second = _hooks(server, tmp_path, "second", lease_seconds=5)
    try:
        tags = wait_status(client, "crash", version, timeout=120)
        assert tags[STATUS] == "done", second.log_tail()
        runs = analysis_runs(client, "crash", version)
        assert [r.info.run_id for r in runs] == [tags["tunelens.analysis.run_id"]]
        assert runs[0].data.tags["tunelens.analysis.attempt"] == "2"
    finally:
        assert second.stop() == 0


def test_moe_target_parameters_version_is_analysed_per_expert(mlflow_server, tmp_path):
    """A registered Mixtral adapter made with target_parameters: the hook analyses every expert
    and logs the experts section with the analysis."""
    from support.factories import make_moe_adapter, tiny_moe

    base = tiny_moe(tmp_path / "base", "mixtral")
    adapter = make_moe_adapter(base, tmp_path / "adapter")
    client = MlflowClient(mlflow_server.url)
    hooks = _hooks(mlflow_server, tmp_path, name="moe-hooks")
    try:
        version = register(client, "moe-lora", adapter)
        tags = wait_status(client, "moe-lora", version)
        assert tags[STATUS] == "done", hooks.log_tail()
        run_id = tags["tunelens.analysis.run_id"]
        data = json.loads(open(client.download_artifacts(run_id, "tunelens/analysis.json",
                                                         str(tmp_path))).read())
        assert data["experts"]["num_experts"] == 4
        assert len([m for m in data["modules"] if m["expert"] is not None]) == 2 * 4 * 3
        page = open(client.download_artifacts(run_id, "tunelens/report.html",
                                              str(tmp_path))).read()
        assert 'id="expert-chart"' in page and "fro_by_expert" in page  # the layer × expert grid
    finally:
        assert hooks.stop() == 0
