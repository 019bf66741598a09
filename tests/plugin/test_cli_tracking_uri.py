"""Every command that talks to MLflow takes --tracking-uri and defaults to $MLFLOW_TRACKING_URI."""
from __future__ import annotations

import mlflow
import pytest

from support.cli_support import assert_one_line_error
from tunelens.plugin.cli import build_parser

MLFLOW_COMMANDS = [["hooks"], ["log-adapter", "adapter"], ["promote", "m", "1"],
                   ["rollback", "m"], ["evaluate", "models:/m/1", "--data", "d.jsonl"]]


@pytest.mark.parametrize("argv", MLFLOW_COMMANDS, ids=lambda a: a[0])
def test_every_mlflow_command_takes_tracking_uri(argv):
    args = build_parser().parse_args(argv + ["--tracking-uri", "http://example:5000"])
    assert args.tracking_uri == "http://example:5000"
    assert build_parser().parse_args(argv).tracking_uri is None  # then the environment decides


def test_hooks_without_a_server_says_how_to_name_one(capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert_one_line_error(capsys, ["hooks"], "--tracking-uri", "MLFLOW_TRACKING_URI")


@pytest.fixture
def restore_tracking_uri():
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def test_environment_is_the_default_and_the_flag_wins(mlflow_server, capsys, monkeypatch,
                                                     restore_tracking_uri):
    # Both reach the real server: it answers that the model does not exist.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    assert_one_line_error(capsys, ["rollback", "no-such-model"], "no-such-model")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/unreachable")
    assert_one_line_error(capsys, ["rollback", "no-such-model", "--tracking-uri",
                                   mlflow_server.url], "no-such-model")
