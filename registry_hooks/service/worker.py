"""The worker: takes (name, version) from any trigger and brings the version to a final status.

Triggers (webhook receiver, reconciling scan, registry-store plugin via the scan) only enqueue.
Every job goes: claim (state.try_claim, atomic) -> status running under a lease renewed while it
works -> detect -> resolve the base -> analyse -> write the files -> one MLflow run -> tags and
description -> status done. A killed worker's lease expires and the next scan resumes the job as a
new attempt; runs of earlier attempts are deleted first, so each version keeps exactly one run.
"""
from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tunelens.errors import one_line

from . import state
from .base_resolution import resolve_base_model
from .detection import Detection, detect_adapter
from .mlflow_logging import (ANALYSIS_SECTION, analysis_runs, description_section,
                             experiment_id, log_analysis_run, replace_section, top_layer)
from .sandbox import AnalysisProcess
from .scope import Scope

log = logging.getLogger(__name__)

SKIP_REASON = "tunelens.analysis.reason"
EVAL_DATASET_TAG = "tunelens.eval_dataset"
# Registered-model tags naming text groups for perplexity: "NAME=PATH,PATH,..." and the names of
# the groups that must not get worse, "NAME,...".
EVAL_TEXTS_TAG = "tunelens.eval_texts"
EVAL_GUARD_TAG = "tunelens.eval_texts_guard"
EVAL_ERROR = "tunelens.eval.error"
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                   "DEADLINE_EXCEEDED"}


@dataclass
class JobOutcome:
    name: str
    version: str
    status: str | None  # a final status, or None when another worker owns the job
    detail: str = ""


def _transient(exc: BaseException) -> bool:
    """A failure of the MLflow server or the network, worth retrying, not a bad adapter."""
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, MlflowException) and exc.error_code in TRANSIENT_CODES


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


class LeaseLost(Exception):
    """Another worker took the job over (this one was too slow to renew its lease)."""


class _Heartbeat:
    """Renews the lease every lease/3 s while a job runs; notes if another worker took over."""

    def __init__(self, client: MlflowClient, name: str, version: str, lease: state.Lease,
                 lease_seconds: float):
        self.client, self.name, self.version = client, name, version
        self.lease, self.lease_seconds = lease, lease_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"tunelens-lease-{name}-{version}")

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.check()
                self.lease = state.Lease(self.lease.attempt, self.lease.owner,
                                         time.time() + self.lease_seconds)
                self.client.set_model_version_tag(self.name, self.version, state.LEASE,
                                                  self.lease.render())
            except LeaseLost:
                return
            except MlflowException as exc:  # a blip: the next beat tries again
                log.warning("lease renewal for %s v%s failed: %s", self.name, self.version, exc)

    def check(self) -> None:
        tags = self.client.get_model_version(self.name, self.version).tags
        current = state.Lease.parse(tags.get(state.LEASE))
        if current is None or (current.attempt, current.owner) != (self.lease.attempt,
                                                                     self.lease.owner):
            self.lost = True
            raise LeaseLost(f"{self.name} v{self.version}: lease taken over by {current}")

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
    """Processes queued versions on `threads` threads; enqueue() never blocks."""

    def __init__(self, tracking_uri: str, config: dict, *, threads: int | None = None,
                 dead_workers: frozenset[str] = frozenset()):
        self.tracking_uri = tracking_uri
        self.config = config
        hooks = config["hooks"]
        self.lease_seconds = float(hooks["lease_seconds"])
        self.max_attempts = int(hooks["max_attempts"])
        self.poll_interval = float(hooks["poll_interval"])
        self.experiment_name = hooks["experiment"]
        self.threads = threads or int(hooks["workers"])
        self.owner = state.worker_id()
        # Workers known to be dead (a killed `tunelens server` on the same data dir): their
        # leases are taken over at once rather than after they expire.
        self.dead_workers = dead_workers
        self.scope = Scope.from_config(config)
        self._inbox: queue.Queue[tuple[str, str]] = queue.Queue()
        self._jobs: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._pending: set[tuple[str, str]] = set()
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.outcomes: list[JobOutcome] = []
        # One analysis child process per worker thread (see sandbox.py), started on first use.
        self._sandboxes: queue.Queue[AnalysisProcess] = queue.Queue()
        for _ in range(self.threads):
            self._sandboxes.put(AnalysisProcess(float(hooks["analysis_timeout_seconds"])))

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
        self._inbox.put((name, str(version)))

    def _intake(self) -> None:
        """Marks inbox items queued in MLflow, then passes each version on once."""
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
            try:
                in_scope = self.in_scope(client, key[0])
            except MlflowException as exc:  # the model is gone, or the server blinked: the
                in_scope = False            # scan looks again
                log.warning("could not read registered model %s: %s", key[0], exc)
            if not in_scope:
                log.debug("%s v%s: model outside hooks.models; not touched", *key)
                with self._pending_lock:
                    self._pending.discard(key)
                continue
            try:
                state.mark_queued(client, *key)
            except MlflowException as exc:
                log.warning("could not mark %s v%s queued: %s", *key, exc)
            self._jobs.put(key)

    def scan(self) -> list[tuple[str, str]]:
        """In-scope versions with no final status (none, queued, or running under an expired
        lease or a dead worker's)."""
        client, found, token = self.client(), [], None
        now = time.time()
        scope: dict[str, bool] = {}  # registered model -> in scope, looked up once per scan
        while True:
            page = client.search_model_versions(max_results=1000, page_token=token)
            for mv in page:
                if not state.VersionState.of(mv.tags).needs_work(now, self.dead_workers):
                    continue
                if mv.name not in scope:
                    scope[mv.name] = self.in_scope(client, mv.name)
                if scope[mv.name]:
                    found.append((mv.name, str(mv.version)))
            token = page.token
            if not token:
                return found

    def _scanner(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                found = self.scan()
                for key in found:
                    self.enqueue(*key)
                if first or found:  # the first scan's line tells operators (and tests) it ran
                    log.info("reconciling scan: %d version(s) need work", len(found))
                first = False
            except Exception as exc:  # noqa: BLE001 - the server may be restarting; scan again
                log.warning("reconciling scan failed: %s", one_line(exc))
            self._stop.wait(self.poll_interval)

    def _warm_up(self) -> None:
        """Start the analysis processes now (they import torch and matplotlib), not in a job."""
        sandboxes = [self._sandboxes.get() for _ in range(self.threads)]
        for sandbox in sandboxes:
            sandbox.start()
            self._sandboxes.put(sandbox)

    def _work(self) -> None:
        while True:
            key = self._jobs.get()
            if key is None:
                return
            try:
                self.outcomes.append(self.process(*key))
            except Exception as exc:  # noqa: BLE001 - never let one job stop the worker
                log.error("job %s v%s: %s", *key, one_line(exc))
            finally:
                with self._pending_lock:
                    self._pending.discard(key)

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
        for sandbox in list(self._sandboxes.queue):
            sandbox.stop()

    # --- one job --------------------------------------------------------------------------------
    def process(self, name: str, version: str) -> JobOutcome:
        """Bring one version to done/skipped/failed, unless another worker holds it."""
        client = self.client()
        current = state.VersionState.of(client.get_model_version(name, version).tags)
        if not current.needs_work(dead_workers=self.dead_workers):
            return JobOutcome(name, version, None, f"status {current.status}")
        attempt = current.next_attempt
        while not state.try_claim(client, name, version, attempt):
            if not state.claim_abandoned(client, name, version, attempt, self.lease_seconds):
                return JobOutcome(name, version, None, f"attempt {attempt} claimed by another worker")
            attempt += 1
        lease = state.Lease(attempt, self.owner, time.time() + self.lease_seconds)
        client.set_model_version_tag(name, version, state.LEASE, lease.render())
        if attempt > self.max_attempts:
            # Every earlier attempt died with its worker (crash, OOM kill, restart) or was cut off
            # by the server: stop retrying what may be killing workers.
            error = (f"no attempt finished in {self.max_attempts} tries (each ended with its worker "
                     f"killed or the MLflow server unreachable); see the hook service's log, then "
                     f"delete the version's {state.STATUS} tag to retry")
            log.warning("analysis of %s v%s failed: %s", name, version, error)
            self._finish(client, name, version, state.FAILED, {state.ERROR: error})
            return JobOutcome(name, version, state.FAILED, error)
        client.set_model_version_tag(name, version, state.STATUS, state.RUNNING)
        log.info("analysing %s v%s (attempt %d)", name, version, attempt)
        tmp = Path(tempfile.mkdtemp(prefix="tunelens-hook-"))
        try:
            with _Heartbeat(client, name, version, lease, self.lease_seconds) as beat:
                return self._analyse(client, name, version, attempt, beat, tmp)
        except LeaseLost as exc:
            return JobOutcome(name, version, None, str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure becomes a readable status
            # Name the file as the user knows it, not by our temporary download folder.
            error = one_line(exc).replace(str(tmp / "model"), f"models:/{name}/{version}")
            if _transient(exc) and attempt < self.max_attempts:
                # The server or network, not the adapter: leave the lease to expire and retry.
                log.warning("analysis of %s v%s interrupted (%s); retried after the lease",
                            name, version, error)
                return JobOutcome(name, version, None, error)
            log.warning("analysis of %s v%s failed: %s", name, version, error)
            self._finish(client, name, version, state.FAILED, {state.ERROR: error})
            return JobOutcome(name, version, state.FAILED, error)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _analyse(self, client: MlflowClient, name: str, version: str, attempt: int,
                 beat: _Heartbeat, tmp: Path) -> JobOutcome:
        clock = _PhaseClock()
        detection = detect_adapter(client, name, version, tmp / "model",
                                   max_bytes=int(self.config["hooks"]["max_download_bytes"]))
        clock.lap("download")
        if not detection.is_lora:
            beat.check()
            self._finish(client, name, version, state.SKIPPED,
                         {SKIP_REASON: detection.skip_reason}, beat)
            return JobOutcome(name, version, state.SKIPPED, detection.skip_reason)
        base = resolve_base_model(client, name, version, self.config, detection.model_dir)
        sandbox = self._sandboxes.get()
        try:
            result, files = sandbox.run(detection.adapter_dir, base.path, self.config, tmp / "out")
        finally:
            self._sandboxes.put(sandbox)
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
        summary = result.summary
        layer = top_layer(result)
        description = replace_section(client.get_model_version(name, version).description,
                                      ANALYSIS_SECTION,
                                      description_section(result, experiment, run_id, base))
        client.update_model_version(name, version, description=description)
        self._finish(client, name, version, state.DONE, {
            state.RUN_ID: run_id,
            "tunelens.trainable_params": str(summary.trainable_params),
            "tunelens.layers_modified": str(len(summary.layers_modified)),
            "tunelens.top_layer": "" if layer is None else str(layer),
            "tunelens.mean_delta_fro": f"{summary.mean_delta_fro:.6g}"}, beat)
        clock.lap("mlflow")
        log.info("%s v%s done in %s", name, version, clock)
        self.after_analysis(client, name, version, base, detection)
        return JobOutcome(name, version, state.DONE, run_id)

    def _finish(self, client: MlflowClient, name: str, version: str, status: str,
                tags: dict[str, str], beat: _Heartbeat | None = None) -> None:
        """Write the outcome's tags, then the final status (it is what readers wait for), then
        drop the lease: internal state has no place among the user's tags once a job is final.
        The lease goes after the status, so no scan ever sees an unleased job that is not final
        (it would start it again); the heartbeat stops first, so nothing writes the lease back."""
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if status != state.FAILED and state.ERROR in client.get_model_version(name, version).tags:
            client.delete_model_version_tag(name, version, state.ERROR)
        if beat is not None:
            beat.stop()
        client.set_model_version_tag(name, version, state.STATUS, status)
        client.delete_model_version_tag(name, version, state.LEASE)

    # --- evaluate on registration (the evaluator is tunelens.evaluators') -------------------------
    def after_analysis(self, client: MlflowClient, name: str, version: str, base,
                       detection: Detection) -> None:
        """Hook point run after `done`: evaluate when conf enables it and the model names a
        dataset, on the files the analysis fetched (not a second download)."""
        if not self.config["hooks"].get("evaluate_on_registration"):
            return
        tags = client.get_registered_model(name).tags
        dataset = tags.get(EVAL_DATASET_TAG)
        if not dataset:
            return
        try:
            evaluate_registered_version(client, name, version, dataset, base, self.config,
                                        detection, texts=_listed(tags.get(EVAL_TEXTS_TAG)),
                                        guard=_listed(tags.get(EVAL_GUARD_TAG)))
        except Exception as exc:  # noqa: BLE001 - the analysis stays done; say why eval did not
            log.warning("evaluation of %s v%s failed: %s", name, version, one_line(exc))
            client.set_model_version_tag(name, version, EVAL_ERROR, one_line(exc))


def _listed(value: str | None) -> tuple[str, ...]:
    """A comma-separated tag value as its non-blank parts."""
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def evaluate_registered_version(client: MlflowClient, name: str, version: str, dataset: str,
                                base, config: dict, detection: Detection, texts=(),
                                guard=()) -> None:
    """The seam for the evaluator: it writes its own tags (tunelens.verdict, ...) on the version,
    then promotion.auto_promote (when on) moves the alias if the verdict is PROMOTE."""
    from tunelens.evaluators.promotion import auto_promote
    from tunelens.evaluators.run import evaluate_version
    from tunelens.evaluators.sources import ModelRef

    fetched = ModelRef(name, version, detection.model_dir, detection.adapter_dir)
    evaluate_version(f"models:/{name}/{version}", dataset, base=base.path, config=config,
                     client=client, fetched=fetched, texts=texts, guard=guard)
    promoted = auto_promote(client, name, version, config)
    if promoted is not None:
        log.info("%s", promoted.describe())
