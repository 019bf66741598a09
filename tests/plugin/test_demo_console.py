"""The demo's console: the story on the terminal, engine and library output in the log file."""
from __future__ import annotations

import subprocess
import sys

from support.hooks_support import REPO

SCRIPT = r"""
import logging, subprocess, sys, warnings
from pathlib import Path
from tunelens.demo.console import quiet_console

with quiet_console(Path(sys.argv[1])):
    print("story line")
    print("progress bar", file=sys.stderr)
    logging.getLogger("vllm.engine").info("engine config dump")
    warnings.warn("a library warning")
    subprocess.run([sys.executable, "-c", "import os; os.write(1, b'child stdout\\n'); "
                    "os.write(2, b'child stderr\\n')"], check=True)
print("after the block")
"""


def test_story_on_the_console_everything_else_in_the_log(tmp_path):
    log = tmp_path / "data" / "demo.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["story line", "after the block"]
    assert done.stderr.splitlines() == ["progress bar"]
    text = log.read_text()
    for line in ("engine config dump", "a library warning", "child stdout", "child stderr"):
        assert line in text, text
