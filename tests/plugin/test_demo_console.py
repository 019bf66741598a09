"""The demo's console: the story on the terminal, engine and library output in the log file."""
from __future__ import annotations

import subprocess
import sys

from support.hooks_support import REPO

SCRIPT = r"""
import logging, os, subprocess, sys, warnings
from pathlib import Path
from mlflow.environment_variables import (MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
                                          MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT)
from transformers.utils import logging as transformers_logging
from tunelens.console import quiet_console

with quiet_console(Path(sys.argv[1])):
    print("story line")
    print("progress bar", file=sys.stderr)
    logging.getLogger("vllm.engine").info("engine config dump")
    warnings.warn("a library warning")
    subprocess.run([sys.executable, "-c", "import os; os.write(1, b'child stdout\\n'); "
                    "os.write(2, b'child stderr\\n')"], check=True)
    from mlflow.utils.logging_utils import eprint
    eprint("Successfully registered model 'm'.")
    logging.getLogger("mlflow.transformers").info("mlflow logger line")
    for _ in transformers_logging.tqdm(range(3), desc="Loading weights"):
        pass
    print("mlflow bars", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get(),
          "run links", not MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get())
print("after the block", transformers_logging.is_progress_bar_enabled(),
      MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get(), not MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get())
"""


def test_story_on_the_console_everything_else_in_the_log(tmp_path):
    log = tmp_path / "data" / "demo.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["story line", "mlflow bars False run links False",
                                       "after the block True True True"]
    assert done.stderr.splitlines() == ["progress bar"]
    text = log.read_text()
    for line in ("engine config dump", "a library warning", "child stdout", "child stderr",
                 "Successfully registered model", "mlflow logger line"):
        assert line in text, text


def test_the_lock_line_is_the_gates_refusal(tmp_path):
    """The demo's last step on a server running the tunelens registry store: moving production to
    the REJECTed version through the plain MlflowClient is refused, and the console says why and
    where the UI shows it."""
    from mlflow import MlflowClient

    from support.mlflow_server import MlflowServer
    from support.verdicts import CURRENT, new_versions, sign_verdict
    from tunelens.demo.story import show_the_lock
    from tunelens.registry.promotion import Gatekeeper, promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MlflowServer(tmp_path, uri, args=["--registry-store-uri", "tunelens+" + uri]) as server:
        client = MlflowClient(server.url)
        client.create_registered_model("demo-model", tags={"tunelens.enabled": "true"})
        concise, echo = new_versions(client, "demo-model", tmp_path / "files", 2)
        sign_verdict(client, "demo-model", concise, "PROMOTE", holder=CURRENT)
        promote(client, Gatekeeper.from_config(None), "demo-model", concise)
        sign_verdict(client, "demo-model", echo, "REJECT", holder=CURRENT,
                     reasons="REJECT: corrects nothing")
        lines = show_the_lock(client, server.url, "demo-model", echo)
        assert client.get_registered_model("demo-model").aliases == {"production": concise}
    assert lines[0].startswith(f"MlflowClient().set_registered_model_alias('demo-model', "
                               f"'production', '{echo}') refused (PERMISSION_DENIED): "
                               f"demo-model@production may not point at version {echo}: its "
                               "verdict is REJECT"), lines
    assert lines[1] == (f"  the MLflow UI shows the same message when you add the alias on "
                        f"{server.url}/#/models/demo-model/versions/{echo}")
