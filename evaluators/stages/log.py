"""The logging stage: everything to one MLflow run, then (last) the verdict on the version, so
`tunelens promote` never reads a verdict whose run is incomplete.

The comparison matrix logs its own run with `log_metrics`, `log_run_inputs`, `machine_tags` and
`closed_when_done`, and tags each candidate version with the same `tag_version`.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from tunelens.evaluators.stages.generate import Generated
from tunelens.evaluators.stages.plan import BASE, FINETUNED, EvaluationPlan
from tunelens.evaluators.stages.score import Scored
from tunelens.evaluators.pages.texts import log_text_results
from tunelens.evaluators.verdict import Verdict
from tunelens.registry.files import ModelRef
from tunelens.registry.verdicts import HOLDER_TAG, REASONS_TAG, VERDICT_TAG
from tunelens.registry.version import VersionRef, logged_model_id
from tunelens.settings import EvaluationSettings

TABLE_FILE = "tunelens/eval_table.json"
REPORT_FILE = "tunelens/side_by_side.html"
VERDICT_FILE = "tunelens/verdict.json"


@dataclass(frozen=True)
class RunTarget:
    """Where an evaluation is logged: `run_id` (mlflow.models.evaluate's run) or a new run born
    with `run_tags` (the hook worker's attempt, so a killed attempt's run is found again);
    `set_version_tags`: put the verdict on the version too; `before_version_tags(run_id)` runs
    between the two and may raise to keep the version as it is (the hook worker's check that it
    still owns the job)."""

    run_id: str | None = None
    set_version_tags: bool = True
    run_tags: dict[str, str] = field(default_factory=dict)
    before_version_tags: Callable[[str], None] | None = None

    def tags_version(self, ref: ModelRef) -> bool:
        """Whether the verdict goes on the version too (a local candidate has none)."""
        return self.set_version_tags and ref.registered


def _open_run(client, run_id: str | None, evaluation: EvaluationSettings, ref: ModelRef,
              run_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The run to log into: the caller's (mlflow.models.evaluate's) or a new one we own, born
    with `run_tags` (the hook worker's attempt, so a killed attempt's run is found again)."""
    from tunelens.registry.experiments import experiment_id

    if run_id:
        return run_id, False
    # created on first use; two hook workers evaluating at once both get it
    run = client.create_run(experiment_id(client, evaluation.experiment),
                            run_name=f"eval-{ref.name}-v{ref.version}"
                            if ref.registered else f"eval-{ref.name}",
                            tags={"tunelens.model": ref.uri, **(run_tags or {})})
    return run.info.run_id, True


@contextmanager
def closed_when_done(client, run_id: str, owned: bool):
    """Around logging into `run_id`: a run we opened ends FINISHED, or FAILED when the block
    raises; a caller's run (mlflow.models.evaluate's) is left for its owner to end."""
    try:
        yield
    except Exception:
        if owned:
            client.set_terminated(run_id, status="FAILED")
        raise
    if owned:
        client.set_terminated(run_id)


def log_evaluation(client, plan: EvaluationPlan, generated: Generated, scored: Scored,
                   target: RunTarget) -> str:
    """Everything to one run, then (last) the verdict on the version; returns the run id."""
    ref, verdict = plan.ref, scored.verdict
    run_id, owned = _open_run(client, target.run_id, plan.config.evaluation, ref,
                              target.run_tags)
    with closed_when_done(client, run_id, owned):
        client.log_batch(run_id, params=_params(plan, generated.engine_settings),
                         tags=machine_tags())
        [link] = log_run_inputs(client, run_id, plan, [ref], owned)
        log_metrics(client, run_id, scored.metrics, link)
        client.log_table(run_id, data=scored.table, artifact_file=TABLE_FILE)
        client.log_text(run_id, scored.html, REPORT_FILE)
        log_text_results(client, run_id, scored.texts)
        _log_verdict(client, run_id, ref, verdict, scored.notes)
    if target.before_version_tags is not None:
        target.before_version_tags(run_id)
    if target.tags_version(ref):
        tag_version(client, plan, scored, run_id)
    return run_id


def log_unmeasured(client, plan: EvaluationPlan, verdict: Verdict, engine_settings: dict,
                   target: RunTarget) -> str:
    """An evaluation in which no model gave an output (its deployment was unavailable): the run
    with its settings, test set and INCONCLUSIVE `verdict`, then that verdict on the version, in
    log_evaluation's order; returns the run id."""
    from tunelens.evaluators.pages.version_page import unmeasured_section

    ref = plan.ref
    run_id, owned = _open_run(client, target.run_id, plan.config.evaluation, ref,
                              target.run_tags)
    with closed_when_done(client, run_id, owned):
        client.log_batch(run_id, params=_params(plan, engine_settings), tags=machine_tags())
        log_run_inputs(client, run_id, plan, [ref], owned)
        _log_verdict(client, run_id, ref, verdict, [])
    if target.before_version_tags is not None:
        target.before_version_tags(run_id)
    if target.tags_version(ref):
        _sign_verdict(client, plan, verdict, run_id, lambda: _replace_evaluation_section(
            client, ref, unmeasured_section(
                verdict=verdict, run_id=run_id,
                experiment_id=client.get_run(run_id).info.experiment_id)))
    return run_id


def _log_verdict(client, run_id: str, ref: ModelRef, verdict: Verdict, notes: list[str]) -> None:
    """verdict.json, then the run's verdict, reasons and holder tags."""
    client.log_dict(run_id, {"model": ref.uri, **verdict.to_dict(), "notes": notes}, VERDICT_FILE)
    client.set_tag(run_id, VERDICT_TAG, verdict.decision.value)
    client.set_tag(run_id, REASONS_TAG, verdict.reasons)
    if verdict.holder is not None:
        client.set_tag(run_id, HOLDER_TAG, verdict.holder.tag_value)


def tag_version(client, plan: EvaluationPlan, scored: Scored, run_id: str, *,
                report_file: str = REPORT_FILE, extra_lines: tuple[str, ...] = ()) -> None:
    """The verdict on the version, its description's comparison section with `extra_lines`
    appended (see _sign_verdict)."""
    _sign_verdict(client, plan, scored.verdict, run_id, lambda: _describe_on_version(
        client, plan, scored, run_id, report_file, extra_lines))


def _sign_verdict(client, plan: EvaluationPlan, verdict: Verdict, run_id: str,
                  describe: Callable[[], None]) -> None:
    """The signed statement, then run, reasons and holder tags, `describe` (the description's
    section), and the verdict tag last (a reader never sees a decision whose run is not
    complete); then every evaluated version's gate line."""
    from tunelens.registry.datasets import content_digest
    from tunelens.registry.promotion import Gatekeeper, refresh_promotability
    from tunelens.registry.verdicts import VerdictStatement, write_verdict

    ref = plan.ref
    gate = Gatekeeper.from_config(plan.config)
    statement = VerdictStatement.make(
        gate.key, VersionRef(ref.name, ref.version), verdict.decision.value,
        verdict.holder.tag_value if verdict.holder is not None else None,
        content_digest(plan.dataset), run_id, verdict.reasons)
    write_verdict(client, statement, verdict.reasons, before_decision=describe)
    refresh_promotability(client, gate, ref.name)


@dataclass(frozen=True)
class MetricLink:
    """What a logged metric is about, for MLflow 3's model and evaluation views: the LoggedModel
    of the version it measures and the test set the run took as input (None where unknown)."""

    model_id: str | None = None
    dataset_name: str | None = None
    dataset_digest: str | None = None


def log_run_inputs(client, run_id: str, plan: EvaluationPlan, refs: list[ModelRef],
                   owned: bool) -> list[MetricLink]:
    """The test set as the run's dataset input (when we own the run: mlflow.models.evaluate logs
    its own), each version's LoggedModel as a model input where MLflow 3 records one; returns,
    per ref, the link its metrics carry (its model, the run's test set)."""
    from mlflow.entities import LoggedModelInput

    # a candidate folder evaluated without registering it has no version to link
    model_ids = [logged_model_id(client.get_model_version(ref.name, ref.version))
                 if ref.registered else None for ref in refs]
    datasets = [_dataset_input(plan)] if owned else []
    models = [LoggedModelInput(model_id) for model_id in dict.fromkeys(model_ids) if model_id]
    if datasets or models:
        log_inputs(client, run_id, datasets or None, models or None)
    logged = client.get_run(run_id).inputs.dataset_inputs
    name, digest = (logged[-1].dataset.name, logged[-1].dataset.digest) if logged else (None, None)
    return [MetricLink(model_id, name, digest) for model_id in model_ids]


def _dataset_input(plan: EvaluationPlan):
    """The test set as an MLflow dataset input in the evaluation context."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    path = Path(plan.dataset.source)
    frame = pd.DataFrame({"inputs": plan.dataset.inputs, "targets": plan.dataset.targets})
    # a local file is its own source; a frame passed in memory has none to name. MLflow
    # registers its local-file source class twice and warns that a path matches both.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source can be "
                                "interpreted in multiple ways")
        dataset = mlflow.data.from_pandas(frame, source=str(path.resolve()) if path.is_file()
                                          else None, targets="targets",
                                          name=path.name if path.is_file() else "test set")
    return DatasetInput(dataset._to_mlflow_entity(),
                        [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")])


def machine_tags() -> list:
    """This machine and its library versions as run tags (tunelens.machine.*, .library.*)."""
    from mlflow.entities import RunTag

    from tunelens.machine import this_machine

    return [RunTag(key, value) for key, value in this_machine().tags().items()]


def log_inputs(client, run_id: str, datasets, models) -> None:
    """`client.log_inputs`, once more when a concurrent run added the same dataset first.

    The tracking store adds a dataset it has not seen with a lookup, then an insert: two runs
    logging the same test set at once (two hook workers evaluating two versions) can both miss
    it, and the second insert breaks the unique key (experiment, name, digest). The store rolls
    that call back; by then the dataset exists, so the second call links it."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_inputs(run_id, datasets=datasets, models=models)
    except MlflowException as exc:
        message = str(exc).lower()
        if "unique constraint" not in message and "duplicate entry" not in message:
            raise
        client.log_inputs(run_id, datasets=datasets, models=models)


def _describe_on_version(client, plan: EvaluationPlan, scored: Scored, run_id: str,
                         report_file: str, extra_lines: tuple[str, ...]) -> None:
    """The comparison section of the version's description, beside the analysis's."""
    from tunelens.evaluators.pages.version_page import comparison_section

    ref = plan.ref
    names = {BASE: "base", FINETUNED: f"v{ref.version} (candidate)"}
    for candidate in plan.candidates:
        if candidate.label not in names:
            names[candidate.label] = (f"{candidate.label} (v{candidate.version})"
                                      if candidate.label == plan.holder_label else candidate.label)
    section = comparison_section(
        verdict=scored.verdict, labels=plan.labels, names=names, metrics=scored.metrics,
        primary=plan.primary.name, test=scored.comparison.test_name, rows=len(plan.kept),
        experiment_id=client.get_run(run_id).info.experiment_id, run_id=run_id,
        report_file=report_file)
    _replace_evaluation_section(client, ref, "\n".join((section, *extra_lines)))


def _replace_evaluation_section(client, ref: ModelRef, section: str) -> None:
    """`section` in place of the version description's evaluation section (the rest stays)."""
    from tunelens.registry.description import replace_section

    from tunelens.evaluators.pages.version_page import EVALUATION_SECTION

    description = client.get_model_version(ref.name, ref.version).description
    client.update_model_version(ref.name, ref.version,
                                description=replace_section(description, EVALUATION_SECTION, section))


def _params(plan: EvaluationPlan, engine_settings: dict):
    from mlflow.entities import Param

    settings = plan.settings
    values = {"tunelens.model_uri": plan.model_uri, "tunelens.version": plan.ref.version,
              "tunelens.base": str(plan.base_dir), "tunelens.backend": plan.backend.name,
              "tunelens.backend_reason": plan.backend.reason,
              "tunelens.against": ",".join(plan.against),
              "tunelens.holder": plan.holder.tag_value if plan.holder else "",
              "tunelens.primary_metric": plan.primary.name,
              "tunelens.metrics": ",".join(m.name for m in plan.metrics),
              "tunelens.task_profile": plan.profile.name if plan.profile else "none",
              "tunelens.max_new_tokens": settings.max_new_tokens,
              "tunelens.temperature": settings.temperature, "tunelens.stop": list(settings.stop),
              "tunelens.prompt_template": settings.prompt_template,
              "tunelens.chat_template": settings.chat_template, "tunelens.max_model_len": min(g.max_model_len for g in plan.groups),
              **{f"tunelens.engine.{k}": v for k, v in engine_settings.items()}}
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def log_metrics(client, run_id: str, metrics: dict[str, float],
                link: MetricLink = MetricLink()) -> None:
    """`metrics` on the run in batches, each linked to `link`'s model and test set, leaving out
    values MLflow cannot store (NaN, inf)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0, model_id=link.model_id, dataset_name=link.dataset_name,
                    dataset_digest=link.dataset_digest)
             for k, v in metrics.items() if math.isfinite(v)]
    for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=batch[start:start + 1000])

