"""Analysis state kept on the model version itself, and the one atomic step that claims a job.

Tags on the version: `tunelens.analysis.status` (queued, running, done, skipped, failed),
`tunelens.analysis.run_id`, `tunelens.analysis.error`, and `tunelens.analysis.lease`
("<attempt>:<worker id>:<expiry unix s>"). A crash or restart loses nothing: whatever is not
done/skipped/failed, or is running past its lease, is picked up again by the next scan.

MLflow tags have no compare-and-set, so two workers could both read "queued" and both start. The
claim is therefore a unique-name insert: creating the experiment named by `claim_name(name,
version, attempt)` succeeds for exactly one caller (experiments.name is UNIQUE in every SQL
backend, deleted experiments included; the loser gets RESOURCE_ALREADY_EXISTS). The winner deletes
the claim experiment at once so it never clutters the UI; its name stays reserved. A resumed job
claims attempt n+1, so a lease can be taken over only once per expiry. A claimant killed between
its claim and its lease write leaves a claim no lease names: once that claim is older than a lease,
`claim_abandoned` lets the next worker move on to attempt n+1 instead of waiting forever.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

STATUS = "tunelens.analysis.status"
RUN_ID = "tunelens.analysis.run_id"
ERROR = "tunelens.analysis.error"
LEASE = "tunelens.analysis.lease"
SUMMARY_TAGS = ("tunelens.trainable_params", "tunelens.layers_modified", "tunelens.top_layer",
                "tunelens.mean_delta_fro")

QUEUED, RUNNING, DONE, SKIPPED, FAILED = "queued", "running", "done", "skipped", "failed"
FINAL = frozenset({DONE, SKIPPED, FAILED})

_MAX_EXPERIMENT_NAME = 500


def worker_id() -> str:
    """A fresh id for one worker (process + thread), written into the lease it holds."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Lease:
    attempt: int
    owner: str
    expires_at: float

    def render(self) -> str:
        return f"{self.attempt}:{self.owner}:{self.expires_at:.0f}"

    @classmethod
    def parse(cls, text: str | None) -> "Lease | None":
        try:
            attempt, owner, expires = (text or "").split(":")
            return cls(int(attempt), owner, float(expires))
        except ValueError:
            return None

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) >= self.expires_at


@dataclass(frozen=True)
class VersionState:
    """What the version's tags say about its analysis."""

    status: str | None
    lease: Lease | None
    run_id: str | None

    @classmethod
    def of(cls, tags: dict[str, str]) -> "VersionState":
        return cls(tags.get(STATUS), Lease.parse(tags.get(LEASE)), tags.get(RUN_ID))

    def needs_work(self, now: float | None = None,
                   dead_workers: frozenset[str] = frozenset()) -> bool:
        """Not final, and no live lease: nobody is (still) working on it. A lease held by one of
        `dead_workers` (known killed) is as good as expired."""
        if self.status in FINAL:
            return False
        # A live lease wins over any status: a racing "queued" write must not start a second job.
        return (self.lease is None or self.lease.expired(now)
                or self.lease.owner in dead_workers)

    @property
    def next_attempt(self) -> int:
        return self.lease.attempt + 1 if self.lease else 1


def claim_name(name: str, version: str, attempt: int) -> str:
    """The unique experiment name whose creation claims attempt `attempt` of a version's job."""
    claim = f"tunelens-claims/{name}/v{version}/attempt-{attempt}"
    if len(claim) > _MAX_EXPERIMENT_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()
        claim = f"tunelens-claims/{digest}/v{version}/attempt-{attempt}"
    return claim


def try_claim(client: MlflowClient, name: str, version: str, attempt: int) -> bool:
    """True for exactly one caller per (name, version, attempt), across processes and hosts."""
    try:
        experiment_id = client.create_experiment(claim_name(name, version, attempt))
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            return False
        raise
    client.delete_experiment(experiment_id)
    return True


def claim_abandoned(client: MlflowClient, name: str, version: str, attempt: int,
                    lease_seconds: float, now: float | None = None) -> bool:
    """True when attempt's claim is older than a lease and the version's lease still names an
    earlier attempt (or none): its claimant died before it could write its lease."""
    claim = client.get_experiment_by_name(claim_name(name, version, attempt))
    if claim is None:
        return False
    claimed_at = (claim.creation_time or claim.last_update_time or 0) / 1000
    if (now or time.time()) - claimed_at < lease_seconds:
        return False  # the claimant may still be about to write its lease
    lease = Lease.parse(client.get_model_version(name, version).tags.get(LEASE))
    if lease is not None and lease.attempt >= attempt:
        return False
    if claim.lifecycle_stage == "active":  # it died before deleting its claim, too
        client.delete_experiment(claim.experiment_id)
    return True


def mark_queued(client: MlflowClient, name: str, version: str) -> bool:
    """Set status queued unless the version already has a status; True if it was set."""
    tags = client.get_model_version(name, version).tags
    if tags.get(STATUS) or LEASE in tags:
        return False
    client.set_model_version_tag(name, version, STATUS, QUEUED)
    return True
