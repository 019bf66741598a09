"""`evaluators=["tunelens"]` for mlflow.models.evaluate: a thin door into evaluate_version.

MLflow loads a `model=` URI as pyfunc before any evaluator runs; tunelens must load the base once,
in its own engine. So the model goes in the evaluator config and `model` stays None:

    mlflow.models.evaluate(model=None, data=df, model_type="text", targets="targets",
                           evaluators=["tunelens"],
                           evaluator_config={"tunelens": {"model_uri": "models:/NAME/3"}})

Several versions are compared in one matrix with a recommendation (evaluators.matrix) when the
config names them instead: {"tunelens": {"model_uris": ["models:/NAME/3", "models:/NAME-8b/1"]}}.

Config keys: model_uri or model_uris (one of them is required), base, against (one version only),
backend, max_new_tokens, primary_metric, config (a conf file), texts (text groups for perplexity: a
list of "NAME=PATH" / "PATH" or a dict {name: path}) and guard (the names of the groups that must
not get worse). `extra_metrics` (made with mlflow.metrics.make_metric, returning per-row scores) are
scored for every model like the built-ins, logged as `<model>/<name>`, and one can be named
primary_metric to decide the verdict's quality rule.
"""
from __future__ import annotations

from mlflow.models.evaluation import ModelEvaluator
from mlflow.models.evaluation.artifacts import JsonEvaluationArtifact, TextEvaluationArtifact
from mlflow.models.evaluation.base import EvaluationResult

from tunelens.config import load_config
from tunelens.errors import TunelensError

CONFIG_KEYS = {"model_uri", "model_uris", "base", "against", "backend", "max_new_tokens",
               "primary_metric", "config", "texts", "guard"}


class TunelensEvaluator(ModelEvaluator):
    """Base vs fine-tuned side by side on one engine, with a verdict on the model version."""

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        # Only when invited: evaluators=None must never start an engine uninvited.
        return isinstance(evaluator_config, dict) and bool(
            {"model_uri", "model_uris"} & set(evaluator_config))

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None,
                 extra_metrics=None, custom_artifacts=None, predictions=None, **kwargs):
        from tunelens.evaluators.perplexity import TEXTS_TABLE_FILE
        from tunelens.evaluators.run import REPORT_FILE, TABLE_FILE, VERDICT_FILE, evaluate_version

        unknown = set(evaluator_config) - CONFIG_KEYS
        if unknown:
            raise TunelensError(f"unknown tunelens evaluator_config key(s) {sorted(unknown)}; "
                                f"valid: {sorted(CONFIG_KEYS)}")
        if model is not None:
            raise TunelensError("pass model=None and the version as evaluator_config "
                                "{'tunelens': {'model_uri': 'models:/NAME/VERSION'}}: a model= "
                                "argument makes MLflow load it as pyfunc before tunelens runs")
        config = load_config(evaluator_config.get("config"))
        frame = dataset.features_data.copy()
        if dataset.has_targets:
            frame[config["evaluation"]["targets_column"]] = list(dataset.labels_data)
        if "model_uris" in evaluator_config:
            return _compare(evaluator_config, frame, config, run_id, extra_metrics)
        outcome = evaluate_version(evaluator_config["model_uri"], frame,
                                   base=evaluator_config.get("base"),
                                   against=tuple(evaluator_config.get("against") or ()),
                                   backend=evaluator_config.get("backend"),
                                   max_new_tokens=evaluator_config.get("max_new_tokens"),
                                   config=config, run_id=run_id, extra_metrics=extra_metrics or (),
                                   primary_metric=evaluator_config.get("primary_metric"),
                                   texts=_texts(evaluator_config.get("texts")),
                                   guard=tuple(evaluator_config.get("guard") or ()))
        from mlflow import MlflowClient

        artifact_uri = MlflowClient().get_run(run_id).info.artifact_uri
        artifacts = {
            **({"tunelens_texts": JsonEvaluationArtifact(f"{artifact_uri}/{TEXTS_TABLE_FILE}")}
               if outcome.texts is not None else {}),
            "tunelens_table": JsonEvaluationArtifact(f"{artifact_uri}/{TABLE_FILE}"),
            "tunelens_report": TextEvaluationArtifact(f"{artifact_uri}/{REPORT_FILE}"),
            "tunelens_verdict": JsonEvaluationArtifact(f"{artifact_uri}/{VERDICT_FILE}"),
        }
        return EvaluationResult(metrics=outcome.metrics, artifacts=artifacts, run_id=run_id)


def _compare(evaluator_config: dict, frame, config: dict, run_id: str,
             extra_metrics) -> EvaluationResult:
    """Several versions in one matrix, logged into mlflow.models.evaluate's run."""
    from mlflow import MlflowClient

    from tunelens.evaluators.matrix import MATRIX_FILE, MATRIX_REPORT, MATRIX_TABLE, compare_versions

    if evaluator_config.get("against") or "model_uri" in evaluator_config:
        raise TunelensError("model_uris compares the versions it lists: leave out model_uri and "
                            "against")
    uris = evaluator_config["model_uris"]
    if isinstance(uris, str) or not isinstance(uris, (list, tuple)):
        raise TunelensError("model_uris must be a list of model URIs (models:/NAME/VERSION)")
    outcome = compare_versions(list(uris), frame, base=evaluator_config.get("base"),
                               backend=evaluator_config.get("backend"),
                               max_new_tokens=evaluator_config.get("max_new_tokens"),
                               config=config, extra_metrics=extra_metrics or (),
                               primary_metric=evaluator_config.get("primary_metric"),
                               texts=_texts(evaluator_config.get("texts")),
                               guard=tuple(evaluator_config.get("guard") or ()), run_id=run_id)
    artifact_uri = MlflowClient().get_run(run_id).info.artifact_uri
    artifacts = {"tunelens_matrix_table": JsonEvaluationArtifact(f"{artifact_uri}/{MATRIX_TABLE}"),
                 "tunelens_matrix": TextEvaluationArtifact(f"{artifact_uri}/{MATRIX_REPORT}"),
                 "tunelens_recommendation": JsonEvaluationArtifact(
                     f"{artifact_uri}/{MATRIX_FILE}")}
    return EvaluationResult(metrics=outcome.scores.metrics, artifacts=artifacts, run_id=run_id)


def _texts(value) -> tuple[str, ...]:
    """evaluator_config's texts: ["NAME=PATH" | "PATH", ...], {name: path} or one path."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{name}={path}" for name, path in value.items())
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)
