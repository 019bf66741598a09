"""The worker: takes a version's jobs from any trigger and brings each to a final status.

A version has up to two jobs (state.JobKind), each with its own status, lease and attempts: its
analysis, and its evaluation on registration, queued when the analysis is done if the registered
model names a test set (tag tunelens.eval_dataset: the owner's opt-in) and
hooks.evaluate_on_registration has not turned evaluations off on this service. The evaluation's
progress (queued, running, done with its verdict, failed or skipped with the reason) is shown in
a section of the version's description as well as in its tags. Triggers (webhook receiver,
reconciling scan, registry-store plugin via the scan) only enqueue. Every job goes: claim
(state.try_claim, atomic) -> status running under a lease renewed while it works -> fetch the
version's files -> resolve the base -> its heavy part in a child process (sandbox.py: analyse and
write the files, or evaluate) -> one MLflow run -> tags (and description) -> status done. A
killed worker's lease expires and the next scan resumes the job as a new attempt; runs of earlier
attempts are deleted first, so each job keeps exactly one run.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tunelens.errors import one_line

from . import state
from tunelens.registry.base_model import resolve_base_model
from tunelens.registry.description import ANALYSIS_SECTION, escape_markdown, replace_section
from tunelens.registry.experiments import experiment_id
from tunelens.registry.files import Detection, detect_adapter
from tunelens.registry.version import VersionRef
from tunelens.settings import Settings
from .evaluation import (EVAL_DATASET_TAG, EVAL_GUARD_TAG, EVAL_TEXTS_TAG, EvaluationDone,
                         EvaluationJob, evaluation_runs, listed)
from .mlflow_logging import analysis_runs, description_section, log_analysis_run, summary_tags
from .sandbox import ANALYSIS_WORK, EVALUATION_WORK, SandboxProcess, transient
from .scope import Scope
from .state import ANALYSIS, EVALUATION, JobKind, LeaseLost

log = logging.getLogger(__name__)

SKIP_REASON = ANALYSIS.reason
Job = tuple[JobKind, str, str]  # (kind, registered model, version)
_DOING = {ANALYSIS: "analysing", EVALUATION: "evaluating"}  # the log line that starts a job
PROGRESS_SECTION = "evaluation-progress"  # the description section following the evaluation job


@dataclass
class JobOutcome:
    name: str
    version: str
    status: str | None  # a final status, or None when another worker owns the job
    detail: str = ""
    kind: str = ANALYSIS.name


class _PhaseClock:
    """Seconds spent per phase of a job, for the log line that ends it."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self._last
        self._last = now

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.laps.items())
        return f"{sum(self.laps.values()):.1f} s ({parts})"


class _Heartbeat:
    """Renews the lease every lease/3 s while a job runs; notes if another worker took over."""

    def __init__(self, client: MlflowClient, name: str, version: str, lease: state.Lease,
                 lease_seconds: float, kind: JobKind):
        self.client, self.name, self.version = client, name, version
        self.lease, self.lease_seconds, self.kind = lease, lease_seconds, kind
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"tunelens-lease-{kind.name}-{name}-{version}")

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.check()
                self.lease = state.Lease(self.lease.attempt, self.lease.owner,
                                         time.time() + self.lease_seconds)
                self.client.set_model_version_tag(self.name, self.version, self.kind.lease,
                                                  self.lease.render())
            except LeaseLost:
                return
            except MlflowException as exc:  # a blip: the next beat tries again
                log.warning("lease renewal for %s v%s failed: %s", self.name, self.version, exc)

    def check(self) -> None:
        try:
            state.check_lease(self.client, self.name, self.version, self.lease, self.kind)
        except LeaseLost:
            self.lost = True
            raise

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """No more renewals (before the lease is deleted, so none can write it back)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


class Worker:
    """Processes queued jobs on `threads` threads; enqueue() never blocks."""

    def __init__(self, tracking_uri: str, config: Settings, *, threads: int | None = None,
                 dead_workers: frozenset[str] = frozenset()):
        self.tracking_uri = tracking_uri
        self.config = config
        hooks = config.hooks
        self.lease_seconds = float(hooks.lease_seconds)
        self.max_attempts = int(hooks.max_attempts)
        self.poll_interval = float(hooks.poll_interval)
        self.experiment_name = hooks.experiment
        self.claim_prefix = hooks.claim_prefix
        # A worker with the setting off neither queues nor runs evaluations; in a fleet, those
        # with it on run the ones queued.
        self.evaluates = bool(hooks.evaluate_on_registration)
        self.threads = threads or int(hooks.workers)
        self.owner = state.worker_id()
        # Workers known to be dead (a killed `tunelens server` on the same data dir): their
        # leases are taken over at once rather than after they expire.
        self.dead_workers = dead_workers
        self.scope = Scope.from_config(config)
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending: set[Job] = set()
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.outcomes: list[JobOutcome] = []
        # The analysis's download of a version whose evaluation it queued, kept for that
        # evaluation when this worker runs it (then the files are fetched once); dropped after it.
        self._fetched: dict[tuple[str, str], Detection] = {}
        # Per kind, one child process per worker thread (see sandbox.py), started on first use.
        timeouts = {ANALYSIS: hooks.analysis_timeout_seconds,
                    EVALUATION: hooks.evaluation_timeout_seconds}
        works = {ANALYSIS: ANALYSIS_WORK, EVALUATION: EVALUATION_WORK}
        self._sandboxes: dict[JobKind, queue.Queue[SandboxProcess]] = {}
        for kind, work in works.items():
            self._sandboxes[kind] = queue.Queue()
            for _ in range(self.threads):
                self._sandboxes[kind].put(SandboxProcess(work, float(timeouts[kind])))

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    # --- intake ---------------------------------------------------------------------------------
    def in_scope(self, client: MlflowClient, name: str, model_tags: dict | None = None) -> bool:
        """Whether `name` is tunelens's to analyse (hooks.models / hooks.models_tag)."""
        if self.scope.everything or self.scope.matches_name(name):
            return True
        if self.scope.tag is None:
            return False
        if model_tags is None:
            model_tags = client.get_registered_model(name).tags
        return self.scope.includes(name, model_tags)

    def enqueue(self, name: str, version: str) -> None:
        """Hand a version to the worker; returns at once (the webhook answers right after)."""
        self._enqueue(ANALYSIS, name, version)

    def _enqueue(self, kind: JobKind, name: str, version: str) -> None:
        self._inbox.put((kind, name, str(version)))

    def _intake(self) -> None:
        """Marks inbox analyses queued in MLflow, then passes each job on once."""
        client = self.client()
        while not self._stop.is_set():
            try:
                key = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._pending_lock:
                if key in self._pending:
                    continue
                self._pending.add(key)
            kind, name, version = key
            try:
                in_scope = self.in_scope(client, name)
            except MlflowException as exc:  # the model is gone, or the server blinked: the
                in_scope = False            # scan looks again
                log.warning("could not read registered model %s: %s", name, exc)
            if not in_scope:
                log.debug("%s v%s: model outside hooks.models; not touched", name, version)
                with self._pending_lock:
                    self._pending.discard(key)
                continue
            if kind is ANALYSIS:  # an evaluation is queued by its analysis, in MLflow already
                try:
                    state.mark_queued(client, name, version)
                except MlflowException as exc:
                    log.warning("could not mark %s v%s queued: %s", name, version, exc)
            self._jobs.put(key)

    def jobs_needed(self, tags: dict[str, str], now: float | None = None) -> list[JobKind]:
        """The version's jobs that no one is (still) doing: its analysis unless final; then its
        evaluation, when this worker evaluates and one was queued."""
        if state.VersionState.of(tags).needs_work(now, self.dead_workers):
            return [ANALYSIS]
        evaluation = state.VersionState.of(tags, EVALUATION)
        if (self.evaluates and tags.get(state.STATUS) in state.FINAL
                and evaluation.status is not None
                and evaluation.needs_work(now, self.dead_workers)):
            return [EVALUATION]
        return []

    def scan(self) -> list[Job]:
        """Jobs of in-scope versions with no final status (none, queued, or running under an
        expired lease or a dead worker's)."""
        client, found, token = self.client(), [], None
        now = time.time()
        scope: dict[str, bool] = {}  # registered model -> in scope, looked up once per scan
        while True:
            page = client.search_model_versions(max_results=1000, page_token=token)
            for mv in page:
                kinds = self.jobs_needed(mv.tags, now)
                if not kinds:
                    continue
                if mv.name not in scope:
                    scope[mv.name] = self.in_scope(client, mv.name)
                if scope[mv.name]:
                    found.extend((kind, mv.name, str(mv.version)) for kind in kinds)
            token = page.token
            if not token:
                return found

    def _scanner(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                found = self.scan()
                for key in found:
                    self._enqueue(*key)
                if first or found:  # the first scan's line tells operators (and tests) it ran
                    log.info("reconciling scan: %d job(s) need work", len(found))
                first = False
            except Exception as exc:  # noqa: BLE001 - the server may be restarting; scan again
                log.warning("reconciling scan failed: %s", one_line(exc))
            self._stop.wait(self.poll_interval)

    def _warm_up(self) -> None:
        """Start the analysis children now (they import torch and matplotlib), not in a job. An
        evaluation child starts with the first evaluation: most registries name no test set, and
        those processes would sit idle."""
        sandboxes = [self._sandboxes[ANALYSIS].get() for _ in range(self.threads)]
        for sandbox in sandboxes:
            sandbox.start()
            self._sandboxes[ANALYSIS].put(sandbox)

    def _work(self) -> None:
        while True:
            key = self._jobs.get()
            if key is None:
                return
            kind, name, version = key
            try:
                self.outcomes.append(self.process(name, version, kind))
            except Exception as exc:  # noqa: BLE001 - never let one job stop the worker
                log.error("%s of %s v%s: %s", kind.name, name, version, one_line(exc))
            finally:
                if kind is EVALUATION:
                    self._drop_fetched(name, version)
                with self._pending_lock:
                    self._pending.discard(key)

    def _keep_fetched(self, name: str, version: str, detection: Detection) -> None:
        """Move the analysis's download out of its job's folder, for the evaluation."""
        kept = Path(tempfile.mkdtemp(prefix="tunelens-fetched-")) / "model"
        detection.model_dir.rename(kept)
        adapter_dir = kept / detection.adapter_dir.relative_to(detection.model_dir)
        self._fetched[(name, version)] = replace(detection, model_dir=kept,
                                                 adapter_dir=adapter_dir)

    def _drop_fetched(self, name: str, version: str) -> None:
        detection = self._fetched.pop((name, version), None)
        if detection is not None:
            shutil.rmtree(detection.model_dir.parent, ignore_errors=True)

    def start(self) -> "Worker":
        targets = [self._warm_up, self._intake, self._scanner] + [self._work] * self.threads
        for i, target in enumerate(targets):
            thread = threading.Thread(target=target, daemon=True, name=f"tunelens-worker-{i}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop taking jobs; a job still running is left to its lease and resumed later."""
        self._stop.set()
        for _ in range(self.threads):
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for sandboxes in self._sandboxes.values():
            for sandbox in list(sandboxes.queue):
                sandbox.stop()
        for name, version in list(self._fetched):
            self._drop_fetched(name, version)

    # --- one job --------------------------------------------------------------------------------
    def process(self, name: str, version: str, kind: JobKind = ANALYSIS) -> JobOutcome:
        """Bring one of a version's jobs to done/skipped/failed, unless another worker holds it
        (or, for the evaluation, the analysis is not final yet)."""
        client = self.client()
        tags = client.get_model_version(name, version).tags
        current = state.VersionState.of(tags, kind)
        if not current.needs_work(dead_workers=self.dead_workers):
            return JobOutcome(name, version, None, f"status {current.status}", kind.name)
        if kind is EVALUATION and tags.get(state.STATUS) not in state.FINAL:
            return JobOutcome(name, version, None, "the analysis is not final yet", kind.name)
        attempt = current.next_attempt
        while not state.try_claim(client, name, version, attempt, kind, prefix=self.claim_prefix):
            if not state.claim_abandoned(client, name, version, attempt, self.lease_seconds,
                                         kind=kind, prefix=self.claim_prefix):
                return JobOutcome(name, version, None,
                                  f"attempt {attempt} claimed by another worker", kind.name)
            attempt += 1
        lease = state.Lease(attempt, self.owner, time.time() + self.lease_seconds)
        client.set_model_version_tag(name, version, kind.lease, lease.render())
        if attempt > self.max_attempts:
            # Every earlier attempt died with its worker (crash, OOM kill, restart) or was cut off
            # by the server: stop retrying what may be killing workers.
            error = (f"no attempt finished in {self.max_attempts} tries (each ended with its worker "
                     f"killed or the MLflow server unreachable); see the hook service's log, then "
                     f"set the version's {kind.status} tag to queued to retry")
            log.warning("%s of %s v%s failed: %s", kind.name, name, version, error)
            self._finish(client, name, version, state.FAILED, {kind.error: error}, kind=kind,
                         progress=f"failed: {error}")
            return JobOutcome(name, version, state.FAILED, error, kind.name)
        if kind is EVALUATION:  # before the status: whoever sees `running` sees it on the page
            show_progress(client, name, version, f"running (attempt {attempt}, started "
                          f"{time.strftime('%H:%M:%S UTC', time.gmtime())})")
        client.set_model_version_tag(name, version, kind.status, state.RUNNING)
        log.info("%s %s v%s (attempt %d)", _DOING[kind], name, version, attempt)
        tmp = Path(tempfile.mkdtemp(prefix="tunelens-hook-"))
        work = self._analyse if kind is ANALYSIS else self._evaluate
        try:
            with _Heartbeat(client, name, version, lease, self.lease_seconds, kind) as beat:
                return work(client, name, version, attempt, beat, tmp)
        except LeaseLost as exc:
            return JobOutcome(name, version, None, str(exc), kind.name)
        except Exception as exc:  # noqa: BLE001 - any failure becomes a readable status
            # Name the file as the user knows it, not by our temporary download folder.
            error = one_line(exc)
            fetched = self._fetched.get((name, version)) if kind is EVALUATION else None
            for local in [tmp / "model"] + ([fetched.model_dir] if fetched else []):
                error = error.replace(str(local), VersionRef(name, version).uri)
            if transient(exc) and attempt < self.max_attempts:
                # The server or network, not the input: leave the lease to expire and retry.
                log.warning("%s of %s v%s interrupted (%s); retried after the lease",
                            kind.name, name, version, error)
                return JobOutcome(name, version, None, error, kind.name)
            log.warning("%s of %s v%s failed: %s", kind.name, name, version, error)
            self._finish(client, name, version, state.FAILED, {kind.error: error}, kind=kind,
                         progress=f"failed: {error}")
            return JobOutcome(name, version, state.FAILED, error, kind.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _analyse(self, client: MlflowClient, name: str, version: str, attempt: int,
                 beat: _Heartbeat, tmp: Path) -> JobOutcome:
        clock = _PhaseClock()
        detection = detect_adapter(client, name, version, tmp / "model",
                                   max_bytes=int(self.config.hooks.max_download_bytes))
        clock.lap("download")
        if not detection.is_lora:
            beat.check()
            self._finish(client, name, version, state.SKIPPED,
                         {SKIP_REASON: detection.skip_reason}, beat)
            return JobOutcome(name, version, state.SKIPPED, detection.skip_reason)
        base = resolve_base_model(client, name, version, self.config, detection.model_dir)
        sandbox = self._sandboxes[ANALYSIS].get()
        try:
            result, files = sandbox.run(detection.adapter_dir, base.path, self.config, tmp / "out")
        finally:
            self._sandboxes[ANALYSIS].put(sandbox)
        clock.lap("analysis+report")
        experiment = experiment_id(client, self.experiment_name)
        beat.check()
        for stale in analysis_runs(client, experiment, name, version):
            client.delete_run(stale.info.run_id)  # left by a killed attempt
        run_id = log_analysis_run(client, experiment, name, version, result, files, base, attempt)
        try:
            beat.check()
        except LeaseLost:
            client.delete_run(run_id)
            raise
        description = replace_section(client.get_model_version(name, version).description,
                                      ANALYSIS_SECTION,
                                      description_section(result, experiment, run_id, base))
        client.update_model_version(name, version, description=description)
        # Queued before the analysis is done, so no kill in between can lose it.
        evaluate = self.evaluates and bool(
            client.get_registered_model(name).tags.get(EVAL_DATASET_TAG))
        if evaluate and state.mark_queued(client, name, version, EVALUATION):
            show_progress(client, name, version, "queued: the verdict comes when the evaluation "
                          "has run (its status is the tag tunelens.evaluation.status)")
        self._finish(client, name, version, state.DONE,
                     {state.RUN_ID: run_id, **summary_tags(result)}, beat)
        clock.lap("mlflow")
        log.info("%s v%s done in %s", name, version, clock)
        if evaluate:
            self._keep_fetched(name, version, detection)
            self._enqueue(EVALUATION, name, version)
        return JobOutcome(name, version, state.DONE, run_id)

    def _evaluate(self, client: MlflowClient, name: str, version: str, attempt: int,
                  beat: _Heartbeat, tmp: Path) -> JobOutcome:
        """The side-by-side evaluation (tunelens.evaluators, in a child process), then
        auto-promote, then done: a retry after a kill between the two finds the alias moved
        already and changes nothing."""
        clock = _PhaseClock()
        analysis = client.get_model_version(name, version).tags.get(state.STATUS)
        model_tags = client.get_registered_model(name).tags
        dataset = model_tags.get(EVAL_DATASET_TAG)
        skip = (f"the analysis is {analysis}, not done" if analysis != state.DONE else
                None if dataset else f"the registered model has no {EVAL_DATASET_TAG} tag")
        detection = self._fetched.get((name, version))  # this worker's analysis fetched it
        if skip is None and detection is None:
            detection = detect_adapter(client, name, version, tmp / "model",
                                       max_bytes=int(self.config.hooks.max_download_bytes))
            skip = detection.skip_reason if not detection.is_lora else None
        if skip is not None:
            beat.check()
            self._finish(client, name, version, state.SKIPPED, {EVALUATION.reason: skip}, beat,
                         EVALUATION, progress=f"skipped: {skip}")
            return JobOutcome(name, version, state.SKIPPED, skip, EVALUATION.name)
        base = resolve_base_model(client, name, version, self.config, detection.model_dir)
        clock.lap("download")
        beat.check()
        for stale in evaluation_runs(client, self.config, name, version):
            client.delete_run(stale.info.run_id)  # left by a killed attempt
        job = EvaluationJob(self.tracking_uri, name, version, dataset, base.path, self.config,
                            detection.model_dir, detection.adapter_dir, beat.lease, os.getpid(),
                            texts=listed(model_tags.get(EVAL_TEXTS_TAG)),
                            guard=listed(model_tags.get(EVAL_GUARD_TAG)))
        sandbox = self._sandboxes[EVALUATION].get()
        try:
            done: EvaluationDone = sandbox.run(job)
        finally:
            self._sandboxes[EVALUATION].put(sandbox)
        clock.lap("evaluation")
        try:
            beat.check()
        except LeaseLost:
            client.delete_run(done.run_id)
            raise
        from tunelens.registry.promotion import Gatekeeper, auto_promote

        promoted = auto_promote(client, Gatekeeper.from_config(self.config), name, version)
        if promoted is not None:
            log.info("%s", promoted.describe())
        self._finish(client, name, version, state.DONE, {EVALUATION.run_id: done.run_id}, beat,
                     EVALUATION, progress=f"done: verdict {done.decision} (see the evaluation "
                     "section)")
        clock.lap("mlflow")
        log.info("%s v%s evaluated in %s: %s", name, version, clock, done.decision)
        return JobOutcome(name, version, state.DONE, done.run_id, EVALUATION.name)

    def _finish(self, client: MlflowClient, name: str, version: str, status: str,
                tags: dict[str, str], beat: _Heartbeat | None = None,
                kind: JobKind = ANALYSIS, progress: str | None = None) -> None:
        """Write the outcome's tags, then the final status (it is what readers wait for), then
        drop the lease: internal state has no place among the user's tags once a job is final.
        The lease goes after the status, so no scan ever sees an unleased job that is not final
        (it would start it again); the heartbeat stops first, so nothing writes the lease back."""
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if status != state.FAILED and kind.error in client.get_model_version(name, version).tags:
            client.delete_model_version_tag(name, version, kind.error)
        if progress is not None and kind is EVALUATION:
            show_progress(client, name, version, progress)
        if beat is not None:
            beat.stop()
        client.set_model_version_tag(name, version, kind.status, status)
        client.delete_model_version_tag(name, version, kind.lease)


def show_progress(client: MlflowClient, name: str, version: str, line: str) -> None:
    """The evaluation job's state in the version's description, where its page shows it."""
    description = client.get_model_version(name, version).description
    client.update_model_version(name, version, description=replace_section(
        description, PROGRESS_SECTION,
        f"### tunelens evaluation on registration\n\n{escape_markdown(line)}"))
