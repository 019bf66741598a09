"""`evaluators=["tunelens"]` for mlflow.models.evaluate: a thin door into evaluate_version.

The version is MLflow's `model` argument when `tunelens log-adapter` (tunelens.log_adapter) logged
it: its pyfunc flavor is a handle that loads nothing (tunelens.registry.version_handle), and the
evaluator finds the registered version from the handle's LoggedModel id:

    mlflow.models.evaluate(model="models:/NAME/3", data=df, model_type="text",
                           targets="targets", evaluators=["tunelens"])

A version logged otherwise (mlflow.transformers.log_model) would be loaded whole by MLflow before
tunelens runs, so it goes in the evaluator config instead and `model` stays None:

    mlflow.models.evaluate(model=None, data=df, model_type="text", targets="targets",
                           evaluators=["tunelens"],
                           evaluator_config={"tunelens": {"model_uri": "models:/NAME/3"}})

Several versions are compared in one matrix with a recommendation (evaluators.matrix) when the
config names them instead: {"tunelens": {"model_uris": ["models:/NAME/3", "models:/NAME-8b/1"]}}.

Config keys: model_uri or model_uris (unless `model` is a tunelens handle), base, against (one
version only), backend, max_new_tokens, primary_metric, config (a conf file), texts (text groups
for perplexity: a list of "NAME=PATH" / "PATH" or a dict {name: path}), guard (the names of the
groups that must not get worse), endpoint and api_key_env (evaluate on a running
OpenAI-compatible server, as `tunelens evaluate --endpoint URL --api-key-env VAR`).
`extra_metrics` (made with mlflow.metrics.make_metric, returning per-row scores) are scored for
every model like the built-ins, logged as `<model>/<name>`, and one can be named primary_metric to
decide the verdict's quality rule.
"""
from __future__ import annotations

from mlflow.models.evaluation import ModelEvaluator
from mlflow.models.evaluation.artifacts import JsonEvaluationArtifact, TextEvaluationArtifact
from mlflow.models.evaluation.base import EvaluationResult

from tunelens.config import load_config, with_endpoint
from tunelens.errors import TunelensError
from tunelens.registry.version_handle import flavors, is_handle, registered_version
from tunelens.settings import Settings

CONFIG_KEYS = {"model_uri", "model_uris", "base", "against", "backend", "max_new_tokens",
               "primary_metric", "config", "texts", "guard", "endpoint", "api_key_env"}


class TunelensEvaluator(ModelEvaluator):
    """Base vs fine-tuned side by side on one engine, with a verdict on the model version."""

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        # Invited by a version named in the config, or maybe by `model` (MLflow does not show it
        # here): a config of tunelens keys only, none at all included, may come with a tunelens
        # handle, which evaluate() checks; it answers None for any other model, so
        # evaluators=None never starts an engine uninvited.
        if not isinstance(evaluator_config, dict):
            return False
        keys = set(evaluator_config)
        return bool({"model_uri", "model_uris"} & keys) or not keys - CONFIG_KEYS

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None,
                 extra_metrics=None, custom_artifacts=None, predictions=None, **kwargs):
        from tunelens.evaluators.texts.perplexity import TEXTS_TABLE_FILE
        from tunelens.evaluators.run import evaluate_version
        from tunelens.evaluators.stages.log import REPORT_FILE, TABLE_FILE, VERDICT_FILE

        unknown = set(evaluator_config) - CONFIG_KEYS
        if unknown:
            raise TunelensError(f"unknown tunelens evaluator_config key(s) {sorted(unknown)}; "
                                f"valid: {sorted(CONFIG_KEYS)}")
        named = {"model_uri", "model_uris"} & set(evaluator_config)
        handed = _handed_version(model, named) if model is not None else None
        if handed is None and not named:
            return None  # no version named, and `model` is none of tunelens's business
        if handed is not None:
            evaluator_config = {**evaluator_config, "model_uri": handed}
        config = with_endpoint(load_config(evaluator_config.get("config")),
                               evaluator_config.get("endpoint"), evaluator_config.get("api_key_env"))
        frame = dataset.features_data.copy()
        if dataset.has_targets:
            frame[config.evaluation.targets_column] = list(dataset.labels_data)
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


def _handed_version(model, named: set[str]) -> str | None:
    """`models:/NAME/VERSION` of the tunelens handle MLflow loaded from `model=`; None (nothing to
    evaluate) for a model that is none of tunelens's business; an error for an adapter MLflow
    loaded whole, or a version named twice."""
    if named:
        raise TunelensError(f"pass either model= or evaluator_config {sorted(named)[0]}, not both")
    if is_handle(model):
        from mlflow import MlflowClient

        return registered_version(MlflowClient(), model.metadata.model_id)
    if "peft_adaptor" in flavors(model).get("transformers", {}):
        raise TunelensError(
            "MLflow loaded this adapter whole (it was logged by mlflow.transformers.log_model): "
            "pass model=None and the version as evaluator_config {'tunelens': {'model_uri': "
            "'models:/NAME/VERSION'}}, or log it with `tunelens log-adapter`, whose versions "
            "tunelens evaluates from model= without loading them")
    return None


def _compare(evaluator_config: dict, frame, config: Settings, run_id: str,
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
