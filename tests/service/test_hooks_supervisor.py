"""The supervisor ties a whole process tree (own sessions included) to its parent's life."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from support.hooks_support import REPO
from tunelens.registry_hooks.service.supervisor import MARKER_ENV, stop_leftovers

# A parent that starts the supervisor over a child which itself starts a grandchild in a session
# of its own (as MLflow's job runner does), prints the three pids, then sleeps until killed.
PARENT = r"""
import os, subprocess, sys, time
tree = subprocess.Popen([sys.executable, "-m", "tunelens.registry_hooks.service.supervisor",
    str(os.getpid()), "--", sys.executable, "-c",
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
    "start_new_session=True)\n"
    "print(g.pid, flush=True)\n"
    "time.sleep(600)"], stdout=subprocess.PIPE, text=True, start_new_session=True)
grandchild = tree.stdout.readline().strip()
print(tree.pid, grandchild, flush=True)
time.sleep(600)
"""


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_sigkilled_parent_takes_the_whole_tree_with_it():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    supervisor, grandchild = map(int, parent.stdout.readline().split())
    assert os.getsid(grandchild) == grandchild  # out of reach of a group or session kill
    parent.kill()
    parent.wait()
    assert _gone(supervisor, 20) and _gone(grandchild, 20)


def test_stop_leftovers_finds_the_data_dirs_processes_only(tmp_path):
    mine, other = str(tmp_path / "a"), str(tmp_path / "b")
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    left = subprocess.Popen(sleep, env={**os.environ, MARKER_ENV: mine}, start_new_session=True)
    bystander = subprocess.Popen(sleep, env={**os.environ, MARKER_ENV: other})
    try:
        time.sleep(0.5)  # let exec finish so /proc/PID/environ shows the new environment
        assert stop_leftovers(mine, grace=5) == [left.pid]
        assert _gone(left.pid, 5) and bystander.poll() is None
    finally:
        for process in (left, bystander):
            process.kill()
            process.wait()
