"""The analysis runs in a child process of the hook service, under a time limit.

An uploaded adapter is hostile until analysed: one that takes hours (tens of thousands of tiny
modules), exhausts memory (the kernel's OOM killer) or crashes a native library must cost one
`failed` version and a fresh child, never the hook service or the versions queued behind it. The
child is started once and reused (importing torch and matplotlib takes seconds), and replaced
after a timeout or a crash.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

from tunelens.errors import TunelensError, one_line


class AnalysisStopped(TunelensError):
    """The child ran out of time or died; the message says which and what to do."""


class AnalysisFailed(TunelensError):
    """The analysis raised in the child; the message is its one readable line."""


def analyse_to_files(adapter_dir: Path, base_path: Path | None, config: dict, out_dir: Path):
    """analyze_adapter + write_analysis: (AnalysisResult, AnalysisFiles)."""
    from tunelens.registry_hooks.engine.analysis import analyze_adapter
    from tunelens.registry_hooks.report.outputs import write_analysis

    result = analyze_adapter(adapter_dir, base=base_path, config=config, progress=False)
    return result, write_analysis(result, out_dir, config=config)


def _exit_with(parent: int) -> None:
    """Exit as soon as `parent` is gone: a SIGKILLed hook service must not leave its analysis
    running on (PR_SET_PDEATHSIG would fire when the thread that started us ends, not the process)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _serve(connection) -> None:
    """The child's loop: one job per message, its result or its error line back."""
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    # Imported before the first job, not during it.
    from tunelens.registry_hooks.engine import analysis  # noqa: F401
    from tunelens.registry_hooks.report import outputs  # noqa: F401

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    connection.send(("ready", None))
    while True:
        try:
            job = connection.recv()
        except EOFError:  # the parent is gone
            return
        try:
            connection.send((True, analyse_to_files(*job)))
        except Exception as exc:  # noqa: BLE001 - every failure goes back as one line
            connection.send((False, one_line(exc)))


class AnalysisProcess:
    """One child process running analyses one at a time, each within `timeout` seconds."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._process = None
        self._connection = None

    def start(self) -> "AnalysisProcess":
        """Start the child unless it runs; it imports everything before its first job."""
        if self._process is not None and self._process.is_alive():
            return self
        self.stop()  # a dead child's pipe
        context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_end,), daemon=True,
                                        name="tunelens-analysis")
        self._process.start()
        child_end.close()
        return self

    def run(self, adapter_dir: Path, base_path: Path | None, config: dict, out_dir: Path):
        """(AnalysisResult, AnalysisFiles), or AnalysisFailed / AnalysisStopped saying why not."""
        self.start()
        self._connection.send((adapter_dir, base_path, config, out_dir))
        while True:
            if not self._connection.poll(self.timeout):
                self.stop()
                raise AnalysisStopped(
                    f"the analysis took longer than hooks.analysis_timeout_seconds "
                    f"({self.timeout:g} s) and was stopped; raise the limit for adapters this "
                    f"large, or check the adapter (tens of thousands of modules?)")
            try:
                ok, value = self._connection.recv()
            except (EOFError, OSError):
                raise self._died() from None
            if ok == "ready":  # a fresh child says it has imported everything: keep waiting
                continue
            if not ok:
                raise AnalysisFailed(value)
            return value

    def _died(self) -> AnalysisStopped:
        self._process.join(5)
        code = self._process.exitcode
        self.stop()
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                how += " (most often the kernel's OOM killer: the adapter needs more memory)"
        else:
            how = f"exited with code {code}"
        return AnalysisStopped(f"the analysis process {how}; the hook service goes on")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
            self._process = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
