"""The experiments tunelens logs into (the analysis's, the evaluation's), by name."""
from __future__ import annotations

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode


def experiment_id(client: MlflowClient, name: str) -> str:
    """The named experiment's id (the analysis's, the evaluation's), created on first use (two
    workers racing both get it)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id
