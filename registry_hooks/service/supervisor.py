"""Keeps a command's whole process tree tied to one parent: when the parent dies, the tree ends.

`tunelens server` starts MLflow through this supervisor (`python -m
tunelens.registry_hooks.service.supervisor PARENT_PID -- CMD...`). MLflow's server spawns its own
children (uvicorn workers, the job runner, huey consumers), some in sessions of their own, so
neither a process-group kill nor a parent-death signal on the direct child reaches them all. The
supervisor therefore
- asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG) and also checks its parent
  every half second (the signal follows the parent *thread* that started it, not the process);
- is a child subreaper (PR_SET_CHILD_SUBREAPER): descendants orphaned by their own parent are
  re-parented to it instead of to init, so it can always find the whole tree;
- on its parent's death, on SIGTERM, or when CMD exits, terminates every descendant (SIGTERM,
  then SIGKILL after `GRACE_SECONDS`) and exits with CMD's exit code.

Every process of the tree also inherits `MARKER_ENV` (the data dir) in its environment, so a
later start can find and stop what a run killed together with its supervisor left behind
(`stop_leftovers`), without trusting a pid that may have been reused.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

MARKER_ENV = "TUNELENS_SERVER_DATA_DIR"
GRACE_SECONDS = 10.0
KILL_WAIT_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def reap_orphans(keep: int | None = None) -> None:
    """Collect exited children (orphans re-parented here included) except `keep`, whose exit
    status its Popen reads."""
    for child in psutil.Process().children():
        try:
            if child.pid != keep and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    reap_orphans()
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            pass
    return alive


def end_processes(processes: list[psutil.Process], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM each, then SIGKILL whatever still runs after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT_SECONDS)):
        for process in processes:
            try:
                process.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.monotonic() + wait
        while processes and time.monotonic() < deadline:
            processes = _running(processes)
            time.sleep(0.1)
        if not processes:
            return


def end_descendants(grace: float = GRACE_SECONDS) -> None:
    """End every descendant of this process, including orphans re-parented to it (subreaper), in
    at most `grace` + `KILL_WAIT_SECONDS`: SIGTERM to each as it is found (a child may spawn while
    its parent stops), SIGKILL to whatever still runs once `grace` has passed."""
    me = psutil.Process()
    kill_at = time.monotonic() + grace
    give_up_at = kill_at + KILL_WAIT_SECONDS
    signalled: set[int] = set()
    while time.monotonic() < give_up_at:
        alive = _running(me.children(recursive=True))
        if not alive:
            return
        killing = time.monotonic() >= kill_at
        for process in alive:
            if killing or process.pid not in signalled:
                try:
                    process.send_signal(signal.SIGKILL if killing else signal.SIGTERM)
                except psutil.Error:
                    pass
                signalled.add(process.pid)
        time.sleep(0.1)


def stop_leftovers(data_dir: str, grace: float = GRACE_SECONDS) -> list[int]:
    """Stop this user's processes whose environment names `data_dir` as their server's; pids."""
    me, uid = os.getpid(), os.getuid()
    found = []
    for process in psutil.process_iter(["pid", "uids"]):
        try:
            if process.pid == me or process.info["uids"] is None or process.info["uids"].real != uid:
                continue
            if process.environ().get(MARKER_ENV) == data_dir:
                found.append(process)
        except psutil.Error:  # gone, or not ours to read
            continue
    end_processes(found, grace)
    return [p.pid for p in found]


def main(argv: list[str]) -> int:
    parent, separator, *command = argv
    if separator != "--" or not command:
        print("usage: python -m tunelens.registry_hooks.service.supervisor PARENT_PID -- CMD...",
              file=sys.stderr)
        return 2
    parent_pid = int(parent)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        return 1
    child = subprocess.Popen(command)
    while not stop.wait(0.5):
        reap_orphans(keep=child.pid)
        if os.getppid() != parent_pid or child.poll() is not None:
            break
    asked_to_stop = stop.is_set() or os.getppid() != parent_pid
    end_descendants()
    code = child.wait()
    if asked_to_stop:
        return 0
    return code if code > 0 else 1  # MLflow exiting on its own is a failure the parent reports


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
