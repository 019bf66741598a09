"""A quiet console for long commands (`tunelens demo`, `tunelens evaluate`): the command's own
lines and progress bars on the terminal; engine and library output in a log file.

vLLM's engine runs in child processes and native libraries (torch, Triton) write straight to file
descriptors 1 and 2, so redirecting Python's loggers is not enough: the descriptors themselves
are pointed at the log file (children inherit that), while `sys.stdout` / `sys.stderr`, which the
command and its progress bars write to, keep a copy of the terminal. The libraries' own progress bars
(transformers loading and saving weights, MLflow moving artifacts) and MLflow's run links would
land on that terminal copy too, so they are switched off.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Environment switches set inside the block (children inherit them), restored after it.
QUIET_ENVIRONMENT = {
    # vLLM would otherwise give its loggers their own handler on sys.stdout (the terminal)
    "VLLM_CONFIGURE_LOGGING": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # MLflow writes "View run ... at: URL" to sys.stdout at the end of every run; the story prints
    # the pages worth opening itself
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _transformers_bars_off():
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def _mlflow_events_to(stream):
    """MLflow's event messages ("Successfully registered model ...", its loggers' lines) go
    through one stream object that writes to whatever sys.stderr is at the time (the terminal
    here): point that object's write/flush at `stream` instead."""
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    MLFLOW_LOGGING_STREAM.write = stream.write
    MLFLOW_LOGGING_STREAM.flush = stream.flush
    try:
        yield
    finally:
        del MLFLOW_LOGGING_STREAM.write, MLFLOW_LOGGING_STREAM.flush


@contextlib.contextmanager
def quiet_console(log_path: Path, verbose: bool = False):
    """Within the block: fds 1/2, logging and warnings -> `log_path`; sys.stdout/stderr -> the
    terminal. `verbose` leaves everything on the terminal."""
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_out, terminal_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    previous = sys.stdout, sys.stderr
    root = logging.getLogger()
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = open(terminal_out, "w", buffering=1, closefd=False)
        sys.stderr = open(terminal_err, "w", buffering=1, closefd=False)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        with (_environment(QUIET_ENVIRONMENT), _transformers_bars_off(),
              open(log_path, "a", buffering=1) as mlflow_log, _mlflow_events_to(mlflow_log)):
            yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = previous
        os.dup2(terminal_out, 1)
        os.dup2(terminal_err, 2)
        for fd in (terminal_out, terminal_err, log_fd):
            os.close(fd)
