"""evaluate_version: base, fine-tuned and the alias holder (and optional others) side by side.

Composed from the four stages (evaluators/stages/), with a typed value between each:
`plan_evaluation` checks every input (dataset, model versions, the promotion alias's holder,
bases, adapter fit, metrics, prompt lengths) and writes nothing; `generate` runs each engine in
turn (one per base: the base never twice in memory, and two bases never at once); `score` turns
outputs into per-row scores, comparisons and the verdict; `log_evaluation` writes the run, then
the version's tags last, so `tunelens promote` never reads a verdict whose run is incomplete. An
engine that cannot start fails in `generate`, before anything is written; a deployment that
cannot be asked (an endpoint unreachable, refusing, too slow, without LoRA) is a finding about it
instead: the run and the version get an INCONCLUSIVE verdict saying so, then `NotMeasured` says it
in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from tunelens.errors import TunelensError
from tunelens.evaluators.engines.choice import BackendChoice
from tunelens.evaluators.engines.openai_server import EndpointUnavailable
from tunelens.evaluators.scoring.stats import PairedComparison
from tunelens.evaluators.stages.generate import generate
from tunelens.evaluators.stages.log import RunTarget, log_evaluation, log_unmeasured
from tunelens.evaluators.stages.plan import EvaluationRequest, plan_evaluation
from tunelens.evaluators.stages.score import score, unmeasured_verdict
from tunelens.evaluators.texts.perplexity import TextResults
from tunelens.evaluators.verdict import Verdict
from tunelens.registry.files import ModelRef
from tunelens.settings import Settings


class NotMeasured(TunelensError):
    """No model gave an output (the deployment was unavailable): the evaluation's run and, when
    asked, the version hold an INCONCLUSIVE verdict saying why; the message is that one line."""

    def __init__(self, cause: Exception, run_id: str, model_uri: str, verdict: Verdict, *,
                 tagged: bool):
        on_version = " and on the version" if tagged else ""
        super().__init__(f"{cause}; nothing was measured: verdict INCONCLUSIVE logged to run "
                         f"{run_id}{on_version}")
        self.run_id, self.model_uri, self.verdict = run_id, model_uri, verdict

    def to_dict(self) -> dict:
        """As EvaluationOutcome.to_dict's verdict fields, with the error line (`--json`)."""
        return {"model": self.model_uri, "run_id": self.run_id, **self.verdict.to_dict(),
                "error": str(self)}


@dataclass(frozen=True)
class EvaluationOutcome:
    """What one evaluation produced; everything here is also on the MLflow run `run_id`."""

    run_id: str
    model_name: str
    version: str
    base_path: Path
    backend: BackendChoice
    labels: list[str]  # "base", "finetuned", the holder's alias if any, then one per --against
    rows_evaluated: int
    rows_skipped_too_long: int
    metrics: dict[str, float]
    table: pd.DataFrame
    comparison: PairedComparison  # finetuned against base
    verdict: Verdict
    primary_metric: str
    holder_label: str | None = None  # the alias, when a version holds it and is compared
    other_comparisons: dict[str, PairedComparison] = field(default_factory=dict)  # vs holder, --against
    notes: list[str] = field(default_factory=list)  # backend, skipped rows, unchanged adapters
    engine_settings: dict = field(default_factory=dict)  # how the engine ran (parallelism, dtype)
    texts: TextResults | None = None  # perplexity of the text groups and activation drift
    model_uri: str = ""  # models:/NAME/VERSION, or the folder of a local candidate


    def per_model(self) -> dict[str, dict[str, float]]:
        """The logged metrics grouped by model label: {label: {metric: value}}."""
        return {label: {key.split("/", 1)[1]: value for key, value in self.metrics.items()
                        if key.startswith(f"{label}/")} for label in self.labels}

    def to_dict(self) -> dict:
        """The outcome as one JSON-ready object (`tunelens evaluate --json`)."""
        deltas = {label: {key.split("/", 1)[1]: value for key, value in self.metrics.items()
                          if key.startswith(f"delta_vs_{label}/")}
                  for label in self.labels[2:]}
        deltas = {"base": {key.split("/", 1)[1]: value for key, value in self.metrics.items()
                           if key.startswith("delta/")}, **deltas}
        return {"model": self.model_uri, "run_id": self.run_id,
                **self.verdict.to_dict(), "primary_metric": self.primary_metric,
                "holder_label": self.holder_label, "labels": self.labels,
                "rows_evaluated": self.rows_evaluated,
                "rows_skipped_too_long": self.rows_skipped_too_long,
                "backend": {"name": self.backend.name, "reason": self.backend.reason},
                "metrics": self.per_model(), "deltas": deltas, "notes": self.notes}


def evaluate(client, request: EvaluationRequest, config: Settings,
             target: RunTarget = RunTarget()) -> EvaluationOutcome:
    """Plan, generate, score and log one evaluation (see evaluate_version)."""
    plan = plan_evaluation(client, request, config)
    try:
        generated = generate(plan)
    except EndpointUnavailable as exc:
        verdict = unmeasured_verdict(plan, str(exc))
        run_id = log_unmeasured(client, plan, verdict, {"endpoint": exc.url}, target)
        raise NotMeasured(exc, run_id, plan.ref.uri, verdict,
                          tagged=target.tags_version(plan.ref)) from None
    scored = score(plan, generated)
    run_id = log_evaluation(client, plan, generated, scored, target)
    return EvaluationOutcome(run_id=run_id, model_name=plan.ref.name, version=plan.ref.version,
                             base_path=plan.base_dir, backend=plan.backend, labels=plan.labels,
                             rows_evaluated=len(plan.kept), rows_skipped_too_long=plan.skipped,
                             metrics=scored.metrics, table=scored.table,
                             comparison=scored.comparison, verdict=scored.verdict,
                             primary_metric=plan.primary.name, holder_label=plan.holder_label,
                             other_comparisons=scored.other_comparisons, notes=scored.notes,
                             engine_settings=generated.engine_settings, texts=scored.texts,
                             model_uri=plan.ref.uri)


def evaluate_version(model_uri: str, data, *, config: Settings, base: str | Path | None = None,
                     against: tuple[str, ...] | list[str] = (),
                     backend: str | None = None, max_new_tokens: int | None = None,
                     run_id: str | None = None, client=None, set_version_tags: bool = True,
                     extra_metrics=(), primary_metric: str | None = None,
                     fetched: ModelRef | None = None, run_tags: dict[str, str] | None = None,
                     before_version_tags: Callable[[str], None] | None = None, texts=(),
                     guard=(), candidate: str | Path | None = None) -> EvaluationOutcome:
    """Evaluate models:/NAME/VERSION against its base and the holder of promotion.alias (and
    `against` aliases/versions) on `data`, with `config` (a load_config() result, read at the
    command's edge): the keyword door into `evaluate`, each argument a
    field of `EvaluationRequest` (what to evaluate) or `RunTarget` (where it is logged).

    Logs metrics `base/…`, `finetuned/…`, `<alias or vN>/…`, `delta/…` (finetuned minus base),
    `delta_vs_<label>/…`, the per-row table and the side-by-side HTML report to one run, then
    tags the version with the verdict and the holder it covered. `candidate`: an adapter or full
    model folder on disk evaluated instead of `model_uri` (pass ""), against `base`, with no
    holder and no version to tag. Raises TunelensError, before anything is written, for every
    bad input; NotMeasured, after logging its INCONCLUSIVE verdict, when the endpoint's server
    gave no output.
    """
    from mlflow import MlflowClient

    request = EvaluationRequest(model_uri, data, base=base, against=tuple(against),
                                backend=backend, max_new_tokens=max_new_tokens,
                                extra_metrics=tuple(extra_metrics), primary_metric=primary_metric,
                                texts=tuple(texts), guard=tuple(guard), fetched=fetched,
                                candidate=Path(candidate) if candidate is not None else None)
    target = RunTarget(run_id, set_version_tags, dict(run_tags or {}), before_version_tags)
    return evaluate(client or MlflowClient(), request, config, target)
