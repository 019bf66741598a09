"""Per-version job state kept on the model version itself, and the one atomic step that claims a job.

A version has up to two jobs, each a `JobKind` with its own tags under its prefix: the analysis
(`tunelens.analysis.*`) and the evaluation on registration (`tunelens.evaluation.*`). Per kind:
`<prefix>.status` (queued, running, done, skipped, failed), `<prefix>.run_id`, `<prefix>.error`,
and `<prefix>.lease` ("<attempt>:<worker id>:<expiry unix s>"). A crash or restart loses nothing:
whatever is not done/skipped/failed, or is running past its lease, is picked up again by the next
scan.

MLflow tags have no compare-and-set, so two workers could both read "queued" and both start. The
claim is therefore a unique-name insert: creating the experiment named by `claim_name(name,
version, attempt, kind)` succeeds for exactly one caller (experiments.name is UNIQUE in every SQL
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
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

QUEUED, RUNNING, DONE, SKIPPED, FAILED = "queued", "running", "done", "skipped", "failed"
FINAL = frozenset({DONE, SKIPPED, FAILED})


@dataclass(frozen=True)
class JobKind:
    """One kind of per-version job and the tags, all under `prefix`, that hold its state."""

    name: str  # "analysis", "evaluation": in log lines and messages
    prefix: str
    # Put before "attempt-<n>" in the claim's name. The analysis's is empty: its claims were named
    # before there was another kind, and the names already reserved must keep meaning the same.
    claim_label: str
    status: str = field(init=False)  # queued, running, done, skipped, failed
    lease: str = field(init=False)  # "<attempt>:<worker id>:<expiry>", only while the job runs
    error: str = field(init=False)  # why it failed, one line
    reason: str = field(init=False)  # why it was skipped
    run_id: str = field(init=False)  # the job's one run
    attempt: str = field(init=False)  # on the run: the attempt that made it

    def __post_init__(self):
        for tag in ("status", "lease", "error", "reason", "run_id", "attempt"):
            object.__setattr__(self, tag, f"{self.prefix}.{tag}")


ANALYSIS = JobKind("analysis", "tunelens.analysis", "")
EVALUATION = JobKind("evaluation", "tunelens.evaluation", "evaluation-")

# The analysis's tags, read in many places.
STATUS, RUN_ID, ERROR, LEASE = ANALYSIS.status, ANALYSIS.run_id, ANALYSIS.error, ANALYSIS.lease
SUMMARY_TAGS = ("tunelens.trainable_params", "tunelens.layers_modified", "tunelens.top_layer",
                "tunelens.mean_module_fro", "tunelens.max_module_fro",
                "tunelens.mean_layer_fro_sum", "tunelens.max_layer_fro_sum")

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
    """What the version's tags say about one of its jobs (the analysis unless `kind` says)."""

    status: str | None
    lease: Lease | None
    run_id: str | None

    @classmethod
    def of(cls, tags: dict[str, str], kind: JobKind = ANALYSIS) -> "VersionState":
        return cls(tags.get(kind.status), Lease.parse(tags.get(kind.lease)), tags.get(kind.run_id))

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


class LeaseLost(Exception):
    """Another worker took the job over (this one was too slow to renew its lease)."""


def check_lease(client: MlflowClient, name: str, version: str, held: Lease,
                kind: JobKind = ANALYSIS) -> None:
    """Raise LeaseLost unless the version's `kind` lease is still `held`'s (attempt and owner)."""
    current = Lease.parse(client.get_model_version(name, version).tags.get(kind.lease))
    if current is None or (current.attempt, current.owner) != (held.attempt, held.owner):
        raise LeaseLost(f"{name} v{version}: {kind.name} lease taken over by {current}")


def claim_name(name: str, version: str, attempt: int, kind: JobKind = ANALYSIS, *,
               prefix: str) -> str:
    """The unique experiment name whose creation claims attempt `attempt` of a version's job of
    `kind`, under `prefix` (hooks.claim_prefix: a plain name or a workspace folder such as
    /Shared/tunelens-claims). Read from the right it is unambiguous whatever the model's name
    holds: the last part names the kind and attempt, the one before it the version."""
    last = f"{kind.claim_label}attempt-{attempt}"
    folder = prefix.rstrip("/")
    claim = f"{folder}/{name}/v{version}/{last}"
    if len(claim) > _MAX_EXPERIMENT_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()
        claim = f"{folder}/{digest}/v{version}/{last}"
    return claim


def try_claim(client: MlflowClient, name: str, version: str, attempt: int,
              kind: JobKind = ANALYSIS, *, prefix: str) -> bool:
    """True for exactly one caller per (name, version, attempt, kind), across processes and hosts."""
    try:
        experiment_id = client.create_experiment(claim_name(name, version, attempt, kind,
                                                            prefix=prefix))
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            return False
        raise
    client.delete_experiment(experiment_id)
    return True


def claim_abandoned(client: MlflowClient, name: str, version: str, attempt: int,
                    lease_seconds: float, now: float | None = None,
                    kind: JobKind = ANALYSIS, *, prefix: str) -> bool:
    """True when attempt's claim is older than a lease and the version's lease (of `kind`) still
    names an earlier attempt (or none): its claimant died before it could write its lease."""
    claim = client.get_experiment_by_name(claim_name(name, version, attempt, kind, prefix=prefix))
    if claim is None:
        return False
    claimed_at = (claim.creation_time or claim.last_update_time or 0) / 1000
    if (now or time.time()) - claimed_at < lease_seconds:
        return False  # the claimant may still be about to write its lease
    lease = Lease.parse(client.get_model_version(name, version).tags.get(kind.lease))
    if lease is not None and lease.attempt >= attempt:
        return False
    if claim.lifecycle_stage == "active":  # it died before deleting its claim, too
        client.delete_experiment(claim.experiment_id)
    return True


def mark_queued(client: MlflowClient, name: str, version: str, kind: JobKind = ANALYSIS) -> bool:
    """Set the status of the version's `kind` job to queued unless it already has one (or a
    lease); True if it was set."""
    tags = client.get_model_version(name, version).tags
    if tags.get(kind.status) or kind.lease in tags:
        return False
    client.set_model_version_tag(name, version, kind.status, QUEUED)
    return True
