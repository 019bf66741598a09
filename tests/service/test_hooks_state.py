"""Version state from tags, and the claim: exactly one winner per attempt, even when racing."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from mlflow import MlflowClient

from support.hooks_support import register
from tunelens.config import load_config, with_changes
from tunelens.registry_hooks.service.state import (EVALUATION, ERROR, LEASE, RUN_ID, STATUS, Lease,
                                                   VersionState, claim_name, try_claim)
from tunelens.registry_hooks.service.worker import Worker

PREFIX = load_config().hooks.claim_prefix


def test_needs_work_follows_status_and_lease():
    now = time.time()
    live, dead = Lease(1, "w", now + 30).render(), Lease(1, "w", now - 1).render()
    assert VersionState.of({}).needs_work()
    assert VersionState.of({STATUS: "queued"}).needs_work()
    assert not VersionState.of({STATUS: "running", LEASE: live}).needs_work()
    assert not VersionState.of({STATUS: "queued", LEASE: live}).needs_work()  # a racing write
    assert VersionState.of({STATUS: "running", LEASE: dead}).needs_work()
    for final in ("done", "skipped", "failed"):
        assert not VersionState.of({STATUS: final, LEASE: dead}).needs_work()
    assert VersionState.of({STATUS: "running", LEASE: dead}).next_attempt == 2
    assert Lease.parse("garbage") is None and VersionState.of({}).next_attempt == 1
    # a lease held by a worker known dead (a killed server on the same data dir) is taken over now
    assert VersionState.of({STATUS: "running", LEASE: live}).needs_work(dead_workers={"w"})
    assert not VersionState.of({STATUS: "running", LEASE: live}).needs_work(dead_workers={"x"})
    assert not VersionState.of({STATUS: "done", LEASE: live}).needs_work(dead_workers={"w"})


def test_racing_claims_have_one_winner_per_attempt(mlflow_server):
    def claim(attempt):
        return try_claim(MlflowClient(mlflow_server.url), "raced/model", "3", attempt,
                         prefix=PREFIX)

    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(claim, [1] * 8))
        second = list(pool.map(claim, [2] * 8))
    assert first.count(True) == 1 and second.count(True) == 1
    assert claim(1) is False
    client = MlflowClient(mlflow_server.url)
    visible = [e.name for e in client.search_experiments() if e.name.startswith("tunelens-claims")]
    assert visible == []  # claims are deleted at once: nothing clutters the UI


def test_each_job_kind_has_its_own_state_and_claims(mlflow_server):
    now = time.time()
    tags = {STATUS: "done", EVALUATION.status: "running",
            EVALUATION.lease: Lease(2, "w", now - 1).render()}
    assert not VersionState.of(tags).needs_work()  # the analysis is done
    evaluation = VersionState.of(tags, EVALUATION)
    assert evaluation.needs_work(now) and evaluation.next_attempt == 3
    # The claim names never meet, whatever the model's name: one winner per kind and attempt.
    assert claim_name("m", "1", 1, EVALUATION, prefix=PREFIX) != claim_name("m", "1", 1,
                                                                            prefix=PREFIX)
    assert claim_name("m/v1/evaluation-attempt-1", "1", 1, prefix=PREFIX) != claim_name(
        "m", "1", 1, EVALUATION, prefix=PREFIX)
    client = MlflowClient(mlflow_server.url)
    assert try_claim(client, "kinds", "1", 1, prefix=PREFIX)
    assert try_claim(client, "kinds", "1", 1, EVALUATION, prefix=PREFIX)
    assert not try_claim(client, "kinds", "1", 1, EVALUATION, prefix=PREFIX)


def _worker(server, lease_seconds: float) -> Worker:
    config = with_changes(load_config(), {"hooks": {"lease_seconds": lease_seconds,
                                                    "max_attempts": 5}})
    return Worker(server.url, config)


def test_claim_stranded_by_a_claimant_killed_before_its_lease_is_taken_over(mlflow_server,
                                                                          llama_adapter):
    client = MlflowClient(mlflow_server.url)
    version = register(client, "stranded", llama_adapter)
    # A worker created attempt 1's claim and was killed before deleting it or writing its lease.
    stranded = client.create_experiment(claim_name("stranded", version, 1, prefix=PREFIX))
    worker = _worker(mlflow_server, lease_seconds=3)
    assert worker.process("stranded", version).status is None  # the claimant may still be alive
    time.sleep(3.2)
    outcome = worker.process("stranded", version)
    assert outcome.status == "done", outcome.detail
    tags = client.get_model_version("stranded", version).tags
    assert LEASE not in tags  # dropped once final
    assert client.get_run(tags[RUN_ID]).data.tags["tunelens.analysis.attempt"] == "2"
    assert client.get_experiment(stranded).lifecycle_stage == "deleted"


def test_a_version_whose_workers_keep_dying_fails_with_a_reason(mlflow_server, llama_adapter):
    client = MlflowClient(mlflow_server.url)
    version = register(client, "deadly", llama_adapter)
    for attempt in range(1, 6):  # five attempts claimed, each worker killed mid-job
        assert try_claim(client, "deadly", version, attempt, prefix=PREFIX)
    client.set_model_version_tag("deadly", version, LEASE, Lease(5, "gone", time.time() - 1).render())
    client.set_model_version_tag("deadly", version, STATUS, "running")
    outcome = _worker(mlflow_server, lease_seconds=30).process("deadly", version)
    tags = client.get_model_version("deadly", version).tags
    assert outcome.status == tags[STATUS] == "failed"
    assert "no attempt finished in 5 tries" in tags[ERROR] and "\n" not in tags[ERROR]


def test_workspace_paths_name_the_analysis_experiment_and_the_claims(mlflow_server, llama_adapter):
    """Managed MLflow services file experiments in folders: a leading-slash path works for the
    analysis experiment and the claims alike."""
    client = MlflowClient(mlflow_server.url)
    version = register(client, "workspace", llama_adapter)
    config = with_changes(load_config(), {"hooks": {
        "experiment": "/Shared/team-a/tunelens-analysis",
        "claim_prefix": "/Shared/team-a/tunelens-claims"}})
    outcome = Worker(mlflow_server.url, config).process("workspace", version)
    assert outcome.status == "done", outcome.detail
    run = client.get_run(client.get_model_version("workspace", version).tags[RUN_ID])
    assert client.get_experiment(run.info.experiment_id).name == "/Shared/team-a/tunelens-analysis"
    claim = claim_name("workspace", version, 1, prefix="/Shared/team-a/tunelens-claims/")
    assert claim == f"/Shared/team-a/tunelens-claims/workspace/v{version}/attempt-1"
    assert client.get_experiment_by_name(claim).lifecycle_stage == "deleted"  # won, then deleted
    assert not try_claim(client, "workspace", version, 1, prefix="/Shared/team-a/tunelens-claims")
