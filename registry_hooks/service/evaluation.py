"""The evaluation job's work, as its child process (sandbox.EVALUATION_WORK) runs it.

The child evaluates with the side-by-side evaluator (imported lazily: the service never needs it
unless a registered model names a test set) on the files the job fetched, logs one run tagged with
the job's attempt, and writes the verdict on the version only while the job's lease is still its
own and the worker that started it is alive. Auto-promote is the worker's step, after this returns.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from tunelens.artifact_uris import fetch_dataset
from tunelens.registry.version import VersionRef
from tunelens.settings import Settings

from . import state

EVAL_DATASET_TAG = "tunelens.eval_dataset"
# Registered-model tags naming text groups for perplexity: "NAME=PATH,PATH,..." and the names of
# the groups that must not get worse, "NAME,...".
EVAL_TEXTS_TAG = "tunelens.eval_texts"
EVAL_GUARD_TAG = "tunelens.eval_texts_guard"


def listed(value: str | None) -> tuple[str, ...]:
    """A comma-separated tag value as its non-blank parts."""
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


@dataclass(frozen=True)
class EvaluationJob:
    """One attempt of a version's evaluation, as handed to the child process."""

    tracking_uri: str
    name: str
    version: str
    dataset: str
    base_path: Path | None
    config: Settings
    model_dir: Path
    adapter_dir: Path
    lease: state.Lease
    worker_pid: int  # the hook service's process: the verdict is not written once it is gone
    texts: tuple[str, ...] = ()  # text groups scored for perplexity ("NAME=PATH" or "PATH")
    guard: tuple[str, ...] = ()  # the groups that must not get worse


@dataclass(frozen=True)
class EvaluationDone:
    run_id: str
    decision: str


def evaluate_in_child(job: EvaluationJob) -> EvaluationDone:
    """evaluate_version on the fetched files; raises state.LeaseLost (its run deleted) when the
    job changed hands or its worker died before the verdict reached the version."""
    from tunelens.evaluators.run import NotMeasured, evaluate_version
    from tunelens.registry.files import ModelRef

    client = MlflowClient(job.tracking_uri)

    def still_ours(run_id: str) -> None:
        try:
            if os.getppid() != job.worker_pid:
                raise state.LeaseLost(f"{job.name} v{job.version}: its worker is gone")
            state.check_lease(client, job.name, job.version, job.lease, state.EVALUATION)
        except state.LeaseLost:
            client.delete_run(run_id)
            raise

    with tempfile.TemporaryDirectory(prefix="tunelens-data-") as fetched:
        try:
            outcome = evaluate_version(
                VersionRef(job.name, job.version).uri,
                fetch_dataset(job.dataset, Path(fetched), job.tracking_uri), base=job.base_path,
                config=job.config, client=client,
                fetched=ModelRef(job.name, job.version, job.model_dir, job.adapter_dir),
                run_tags={state.EVALUATION.attempt: str(job.lease.attempt)},
                before_version_tags=still_ours, texts=job.texts, guard=job.guard)
        except NotMeasured as stopped:  # the endpoint gave nothing: that verdict is the job's result
            return EvaluationDone(stopped.run_id, stopped.verdict.decision.value)
    return EvaluationDone(outcome.run_id, outcome.verdict.decision.value)


def evaluation_runs(client: MlflowClient, config: Settings, name: str, version: str) -> list:
    """Every live run the version's evaluation jobs made (runs of `tunelens evaluate` and
    mlflow.models.evaluate, which carry no attempt, are the user's and are not listed)."""
    experiment = client.get_experiment_by_name(config.evaluation.experiment)
    if experiment is None:
        return []
    # Matched on the version's number (nothing in it needs quoting), then on the whole name.
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`tunelens.model` LIKE '%/{int(version)}'", max_results=1000)
    model = VersionRef(name, version).uri
    return [r for r in runs if r.data.tags.get("tunelens.model") == model
            and state.EVALUATION.attempt in r.data.tags]
