"""Each job's heavy part runs in a child process of the hook service, under a time limit.

An uploaded adapter is hostile until analysed: one that takes hours (tens of thousands of tiny
modules), exhausts memory (the kernel's OOM killer) or crashes a native library must cost one
`failed` version and a fresh child, never the hook service or the versions queued behind it. An
evaluation loads whole models and generates: the same holds for it. A child is started once and
reused (importing torch, matplotlib, the evaluator takes seconds), and replaced after a timeout or
a crash. `ANALYSIS_WORK` and `EVALUATION_WORK` say what a child runs.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunelens.errors import TunelensError, one_line
from tunelens.settings import Settings

TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                   "DEADLINE_EXCEEDED"}


def transient(exc: BaseException) -> bool:
    """A failure of the MLflow server or the network, worth retrying, not a bad input."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, SandboxFailed):
        return exc.transient
    return isinstance(exc, MlflowException) and exc.error_code in TRANSIENT_CODES


class SandboxStopped(TunelensError):
    """The child ran out of time or died; the message says which and what to do."""


class SandboxFailed(TunelensError):
    """The job raised in the child; the message is its one readable line. `transient`: it was the
    MLflow server or the network (the job is worth retrying), not the job's input."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def analyse_to_files(adapter_dir: Path, base_path: Path | None, config: Settings, out_dir: Path):
    """analyze_adapter + write_analysis: (AnalysisResult, AnalysisFiles)."""
    from tunelens.registry_hooks.engine.analysis import analyze_adapter
    from tunelens.registry_hooks.report.outputs import write_analysis

    result = analyze_adapter(adapter_dir, base=base_path, config=config, progress=False)
    return result, write_analysis(result, out_dir, config=config)


@dataclass(frozen=True)
class ChildWork:
    """What a child process runs: `target(*job)` per job, after importing `imports` once."""

    what: str  # "analysis", "evaluation": in messages
    target: Callable  # a module-level function (the spawned child finds it by name)
    imports: tuple[str, ...]
    timeout_setting: str  # the setting that limits it, named in the timeout's message
    too_long_hint: str  # what to do about a job that ran too long


def _evaluate(job):
    from .evaluation import evaluate_in_child

    return evaluate_in_child(job)


ANALYSIS_WORK = ChildWork(
    "analysis", analyse_to_files,
    ("tunelens.registry_hooks.engine.analysis", "tunelens.registry_hooks.report.outputs"),
    "hooks.analysis_timeout_seconds",
    "raise the limit for adapters this large, or check the adapter (tens of thousands of modules?)")
EVALUATION_WORK = ChildWork(
    "evaluation", _evaluate,
    # the engines the evaluator imports lazily too: a job should not pay for them (vLLM is left to
    # the jobs that use it)
    ("tunelens.evaluators.run", "tunelens.registry_hooks.service.evaluation", "torch",
     "transformers.models.auto.modeling_auto", "peft", "scipy.stats"),
    "hooks.evaluation_timeout_seconds",
    "raise the limit for models and test sets this large, or lower evaluation.max_rows")


def _exit_with(parent: int) -> None:
    """Exit as soon as `parent` is gone: a SIGKILLed hook service must not leave its job running
    on (PR_SET_PDEATHSIG would fire when the thread that started us ends, not the process)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _serve(connection, work: ChildWork) -> None:
    """The child's loop: one job per message, its result or its error line back. (This module
    imports nothing heavy at its top, so a child watches its parent within a moment of starting,
    before its own imports.)"""
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    for module in work.imports:  # before the first job, not during it
        importlib.import_module(module)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    connection.send(("ready", None))
    while True:
        try:
            job = connection.recv()
        except EOFError:  # the parent is gone
            return
        try:
            connection.send((True, work.target(*job)))
        except Exception as exc:  # noqa: BLE001 - every failure goes back as one line
            connection.send((False, (one_line(exc), transient(exc))))


class SandboxProcess:
    """One child process running `work` one job at a time, each within `timeout` seconds."""

    def __init__(self, work: ChildWork, timeout: float):
        self.work = work
        self.timeout = timeout
        self._process = None
        self._connection = None

    def start(self) -> "SandboxProcess":
        """Start the child unless it runs; it imports everything before its first job."""
        if self._process is not None and self._process.is_alive():
            return self
        self.stop()  # a dead child's pipe
        context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_end, self.work), daemon=True,
                                        name=f"tunelens-{self.work.what}")
        self._process.start()
        child_end.close()
        return self

    def run(self, *job):
        """`work.target(*job)`'s value, or SandboxFailed / SandboxStopped saying why not."""
        self.start()
        self._connection.send(job)
        while True:
            if not self._connection.poll(self.timeout):
                self.stop()
                raise SandboxStopped(
                    f"the {self.work.what} took longer than {self.work.timeout_setting} "
                    f"({self.timeout:g} s) and was stopped; {self.work.too_long_hint}")
            try:
                ok, value = self._connection.recv()
            except (EOFError, OSError):
                raise self._died() from None
            if ok == "ready":  # a fresh child says it has imported everything: keep waiting
                continue
            if not ok:
                raise SandboxFailed(*value)
            return value

    def _died(self) -> SandboxStopped:
        self._process.join(5)
        code = self._process.exitcode
        self.stop()
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                how += (" (most often the kernel's OOM killer: the job needs more memory than "
                        "the machine has)")
        else:
            how = f"exited with code {code}"
        return SandboxStopped(f"the {self.work.what} process {how}; the hook service goes on")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
            self._process = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
