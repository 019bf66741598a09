"""Version state from tags, and the claim: exactly one winner per attempt, even when racing."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from mlflow import MlflowClient

from tunelens.registry_hooks.state import LEASE, STATUS, Lease, VersionState, try_claim


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


def test_racing_claims_have_one_winner_per_attempt(mlflow_server):
    def claim(attempt):
        return try_claim(MlflowClient(mlflow_server.url), "raced/model", "3", attempt)

    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(claim, [1] * 8))
        second = list(pool.map(claim, [2] * 8))
    assert first.count(True) == 1 and second.count(True) == 1
    assert claim(1) is False
    client = MlflowClient(mlflow_server.url)
    visible = [e.name for e in client.search_experiments() if e.name.startswith("tunelens-claims")]
    assert visible == []  # claims are deleted at once: nothing clutters the UI
