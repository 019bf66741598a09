"""Runs that log the same test set at the same moment each get it as their input, on a real MLflow
server (its store looks a new dataset up, then inserts it: concurrent runs race on that insert);
metrics logged with a link land on the LoggedModel with their test set, on every MLflow in range."""
from __future__ import annotations

import threading

import mlflow.data
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from tunelens.evaluators.stages.log import MetricLink, log_inputs, log_metrics

RUNS_AT_ONCE = 4


# MLflow registers its local-file source class twice and warns that a path matches both.
@pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted")
def test_runs_logging_one_test_set_at_once_each_get_it(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment("inputs-at-once")
    source = tmp_path / "test.jsonl"
    source.write_text("{}\n")
    for attempt in range(8):  # a new dataset (digest) each time, so each attempt races anew
        frame = pd.DataFrame({"inputs": [f"row {attempt}"], "targets": ["target"]})
        dataset = mlflow.data.from_pandas(frame, source=str(source), targets="targets",
                                          name="test.jsonl")
        entity = DatasetInput(dataset._to_mlflow_entity(),
                              [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")])
        runs = [client.create_run(experiment).info.run_id for _ in range(RUNS_AT_ONCE)]
        start, errors = threading.Barrier(RUNS_AT_ONCE), []

        def log(run_id: str) -> None:
            start.wait()
            try:
                log_inputs(client, run_id, [entity], None)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for run_id in runs:
            logged = client.get_run(run_id).inputs.dataset_inputs
            assert [d.dataset.digest for d in logged] == [dataset.digest]


def test_linked_metrics_are_listed_on_the_logged_model_with_their_test_set(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment("linked-metrics")
    model_id = client.create_logged_model(experiment, name="adapter").model_id
    run_id = client.create_run(experiment).info.run_id
    link = MetricLink(model_id, "test.jsonl", "0123abcd")
    log_metrics(client, run_id, {"finetuned/exact_match": 0.75, "delta/chrf": float("nan")}, link)
    [metric] = client.get_logged_model(model_id).metrics  # NaN is left out
    assert (metric.key, metric.value, metric.run_id) == ("finetuned/exact_match", 0.75, run_id)
    assert (metric.dataset_name, metric.dataset_digest) == ("test.jsonl", "0123abcd")
    assert client.get_run(run_id).data.metrics == {"finetuned/exact_match": 0.75}
