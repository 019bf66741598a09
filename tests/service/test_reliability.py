"""Reliability, bounded: a burst on PostgreSQL with two hook processes, SIGKILLs + an MLflow restart + a
stopped hook service, and a forged-webhook flood. Full sizes: benchmarks/bench_reliability.py."""
from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from support.hooks_support import deliveries_only_hooks
from support.mlflow_server import MlflowServer, postgres_database
from support.reliability import (SECRET, Chaos, Fleet, audit, flood, register_versions, source_run,
                         wait_final)


@pytest.fixture
def postgres_server(request, tmp_path):
    request.getfixturevalue("postgres_database_uri")  # fails clearly if PostgreSQL is down
    with postgres_database("tunelens_reliability") as uri, \
            MlflowServer(tmp_path / "mlflow", uri, allow_loopback_webhooks=True, workers=2) as srv:
        yield srv


def test_burst_with_two_hook_processes_analyses_every_version_once(postgres_server, tmp_path,
                                                                   llama_adapter):
    client = MlflowClient(postgres_server.url)
    fleet = Fleet(postgres_server.url, tmp_path, 2, lease_seconds=30, poll_interval=2).start()
    try:
        versions = register_versions(postgres_server.url, "burst",
                                     source_run(client, llama_adapter), 24, threads=8)
        assert len(set(versions)) == 24
        wait_final(client, "burst", versions, timeout=900, fleet=fleet)
        result = audit(client, "burst", versions)
        assert result.problems() == [], fleet.log_tail()
        assert result.done == 24, result.failed
        # Both processes did work: the claims spread the jobs, they did not serialise them.
        logs = [p.log_tail(1_000_000) for p in fleet.processes]
        assert all(" done in " in text for text in logs), fleet.log_tail()
    finally:
        assert fleet.stop() == [0, 0], fleet.log_tail()


def test_kills_restart_and_downtime_leave_every_version_final_with_one_run(
        postgres_server, tmp_path, llama_adapter):
    client = MlflowClient(postgres_server.url)
    run_id = source_run(client, llama_adapter)
    fleet = Fleet(postgres_server.url, tmp_path, 2, lease_seconds=6, poll_interval=2).start()
    restarts = []

    def restart_server(kill: int) -> None:
        if kill == 2:  # the MLflow server goes away mid-run, jobs in flight
            postgres_server.restart()
            restarts.append(kill)

    chaos = Chaos(fleet, 4, max_delay=5, on_kill=restart_server)
    registered: list[str] = []
    registering = threading.Thread(target=lambda: registered.extend(
        register_versions(postgres_server.url, "chaos", run_id, 12, interval=0.5)))
    try:
        registering.start()
        chaos.start()
        registering.join(600)
        chaos.join(600)
        assert chaos.error is None, repr(chaos.error)
        assert len(fleet.kills) == 4 and restarts == [2]
        assert fleet.kills[0], "the first kill must land mid-job"
        assert fleet.orphans == [0] * 4, "an analysis process outlived its hook service"
        # The hook service is down while more versions are registered: the scan finds them later.
        fleet.stop()
        registered += register_versions(postgres_server.url, "chaos", run_id, 4, threads=4)
        time.sleep(2)
        assert all(client.get_model_version("chaos", v).tags.get("tunelens.analysis.status")
                   in (None, "queued") for v in registered[-4:])
        fleet.start()
        assert len(set(registered)) == 16
        wait_final(client, "chaos", registered, timeout=900, fleet=fleet)
        result = audit(client, "chaos", registered)
        assert result.problems() == [], fleet.log_tail()
        assert result.done + len(result.failed) == 16
    finally:
        fleet.stop()


def test_forged_flood_is_rejected_without_delaying_valid_deliveries(tmp_path, llama_adapter):
    with MlflowServer(tmp_path / "mlflow") as server:
        client = MlflowClient(server.url)
        # Only the signed deliveries below can trigger work.
        hooks = deliveries_only_hooks(server.url, tmp_path, SECRET)
        try:
            versions = register_versions(server.url, "flooded", source_run(client, llama_adapter),
                                         8, threads=4)
            report = flood(hooks.url, 300, [("flooded", v) for v in versions])
            assert report.forged_rejected == 300, report.forged_statuses
            assert report.valid_accepted == 8
            # Not a speed goal (that is the benchmark's): a valid delivery must never wait for the
            # flood to drain (300 requests incl. stalled ones take tens of seconds).
            assert max(report.flood_latency_ms) < 5000, report.summary()
            wait_final(client, "flooded", versions, timeout=600)
            result = audit(client, "flooded", versions)
            assert result.problems() == [] and result.done == 8, hooks.log_tail()
            assert hooks.process.poll() is None
            # Rejections are summarised, not logged one line each.
            log = hooks.log_tail(10_000_000)
            assert 1 <= log.count("webhook: rejected") <= 10, log[-3000:]
        finally:
            assert hooks.stop() == 0, hooks.log_tail()
