"""MLflow pointed at a test's tracking server for the length of a fixture."""
from __future__ import annotations

import os
from contextlib import contextmanager

import mlflow


@contextmanager
def tracking_at(url: str):
    """The block's MLflow calls go to `url`: MLFLOW_TRACKING_URI (child processes inherit it)
    and mlflow's own tracking URI; both are put back afterwards."""
    previous_env, previous_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = url
    mlflow.set_tracking_uri(url)
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
        mlflow.set_tracking_uri(previous_uri)
