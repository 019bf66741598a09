"""compare_domains: several fine-tunes and their bases on text groups alone (no test set, nothing
generated): which model is best on which domain.

* plan: each version fetched with its base, grouped by base as the comparison matrix groups them
  (one engine per base, the base labelled as the matrix labels it; a full fine-tune is the model
  of an engine of its own), the text groups tokenised per engine;
* score: each base's engine in turn scores every token of every text for its base and versions
  (the same pass as the text groups of an evaluation), closed before the next;
* the table: per domain (text group) and model, perplexity and mean NLL, and perplexity normalised
  0..1 across the models (texts.domain_table);
* log: one run with `<label>/ppl_<domain>`, `<label>/nll_<domain>`, `<label>/ppl_norm_<domain>`,
  tunelens/domain_perplexity.json and the comparison page (tunelens/matrix.html) it leads.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from tunelens.errors import TunelensError
from tunelens.evaluators.adapter_fit import check_adapter_fits
from tunelens.evaluators.engines.choice import BackendChoice, check_text_scoring, choose_backend
from tunelens.evaluators.inputs.prompts import generation_settings
from tunelens.evaluators.matrix import (MATRIX_REPORT, MatrixModel, base_labels, distinct_versions,
                                        model_label)
from tunelens.evaluators.pages.domains import domains_section
from tunelens.evaluators.pages.report import render_report
from tunelens.evaluators.stages.log import closed_when_done, log_metrics
from tunelens.evaluators.stages.plan import (EngineGroup, check_full_model_fits, context_length,
                                             resolve_base)
from tunelens.evaluators.texts.domain_table import (DOMAIN_FILE, DomainPerplexity,
                                                    domain_perplexity)
from tunelens.evaluators.texts.perplexity import (TextPlan, model_perplexities, plan_texts,
                                                  score_texts)
from tunelens.registry.files import ModelRef, download_version
from tunelens.registry.version import parse_model_uri, resolve_version
from tunelens.settings import Settings


@dataclass(frozen=True)
class DomainPlan:
    models: list[MatrixModel]  # each base first, then its versions
    groups: list[EngineGroup]  # one per base, run in turn
    backend: BackendChoice
    texts: TextPlan
    config: Settings

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.models]


def _fetched(client, model_uris: list[str], base: str | Path | None,
             config: Settings) -> list[tuple[ModelRef, Path]]:
    """Each version's files and base folder, an adapter checked to fit its base, a full
    fine-tune to have its base's architecture."""
    max_bytes = int(config.hooks.max_download_bytes)
    fetched = []
    for uri in model_uris:
        name, version, alias = parse_model_uri(uri)
        ref = download_version(client, name, resolve_version(client, name, version or alias),
                               max_bytes)
        base_dir = resolve_base(client, ref, base, config)
        if ref.full_dir is not None:
            check_full_model_fits(base_dir, ref.full_dir)
        else:
            check_adapter_fits(base_dir, ref.adapter_dir)
        fetched.append((ref, base_dir))
    return fetched


def _models(fetched: list[tuple[ModelRef, Path]]) -> list[MatrixModel]:
    """The bases and versions under the comparison matrix's labels, each base before its versions;
    a full fine-tune's model folder is its own (its engine's model is the version itself)."""
    base_dirs: list[Path] = []
    for _, base_dir in fetched:
        if not any(b.resolve() == base_dir.resolve() for b in base_dirs):
            base_dirs.append(base_dir)
    names = base_labels(base_dirs)
    several_models = len({ref.name for ref, _ in fetched}) > 1
    models = []
    for base_dir in base_dirs:
        models.append(MatrixModel(names[base_dir], "base", base_dir))
        models += [MatrixModel(model_label(ref.name, ref.version, several_models), "candidate",
                               ref.full_dir or base_dir, f"models:/{ref.name}/{ref.version}",
                               ref.adapter_dir)
                   for ref, own_base in fetched if own_base.resolve() == base_dir.resolve()]
    return models


def plan_domains(client, model_uris: list[str], texts, config: Settings, *,
                 base: str | Path | None = None, backend: str | None = None) -> DomainPlan:
    """Check every input and decide what runs where; raises TunelensError, writes nothing."""
    evaluation = config.evaluation
    if not texts and not evaluation.texts.groups:
        raise TunelensError("without --data, give the domains' texts with --texts NAME=PATH "
                            "(one per domain)")
    distinct_versions(client, model_uris, at_least=1)
    models = _models(_fetched(client, model_uris, base, config))
    adapters = [m.adapter_dir for m in models if m.adapter_dir is not None]
    choice = choose_backend(backend or evaluation.backend, adapters)
    check_text_scoring(choice, adapters)
    model_dirs = list(dict.fromkeys(m.base_dir for m in models))  # bases, then full fine-tunes
    groups = [EngineGroup(d, [m.candidate for m in models if m.base_dir == d],
                          context_length(d, evaluation.vllm.max_model_len), [])
              for d in model_dirs]
    text_plan = plan_texts(texts, (), config, model_dirs, min(g.max_model_len for g in groups))
    return DomainPlan(models, groups, choice, text_plan, config)


def score_domains(plan: DomainPlan) -> dict[str, list[np.ndarray]]:
    """Per model label, each token's log-probability in every text: one base's engine at a time."""
    evaluation = plan.config.evaluation
    settings = generation_settings(evaluation.generation, None)
    logprobs: dict[str, list[np.ndarray]] = {}
    for group in plan.groups:
        adapters = [c.adapter_dir for c in group.candidates if c.adapter_dir is not None]
        engine = plan.backend.backend.start(group.base_dir, adapters, evaluation, settings,
                                            group.max_model_len)
        try:
            logprobs |= score_texts(engine, group.candidates, plan.texts, group.base_dir)
        finally:
            engine.close()
    return logprobs


def _notes(plan: DomainPlan) -> list[str]:
    notes = [f"backend: {plan.backend.name} ({plan.backend.reason}); nothing generated",
             plan.texts.note(),
             *(f"engine {i + 1}: {', '.join(c.label for c in g.candidates)} on {g.base_dir}"
               for i, g in enumerate(plan.groups))]
    if len({str(plan.texts.token_ids[str(g.base_dir)]) for g in plan.groups}) > 1:
        notes.append("the bases' tokenizers split the texts differently: perplexity per token "
                     "compares models of different bases only roughly")
    return notes


@dataclass(frozen=True)
class DomainOutcome:
    """What one domain comparison produced; everything here is also on the MLflow run `run_id`."""

    run_id: str
    plan: DomainPlan
    table: DomainPerplexity
    metrics: dict[str, float]

    def to_dict(self) -> dict:
        """The table, the models and the backend (`tunelens evaluate A B --texts ... --json`)."""
        plan = self.plan
        return {"run_id": self.run_id,
                "backend": {"name": plan.backend.name, "reason": plan.backend.reason},
                **self.table.to_dict(),
                # engine_model: the folder its engine loads (a full fine-tune's own)
                "model_details": [{"label": m.label, "role": m.role, "model": m.uri,
                                   "engine_model": str(m.base_dir)} for m in plan.models]}


def _page(outcome: DomainOutcome) -> str:
    """The comparison page: the perplexity-by-domain table first, then the per-model figures."""
    plan, table = outcome.plan, outcome.table
    return render_report(
        title=f"{', '.join(m.label for m in plan.models if m.role == 'candidate')} and their "
              f"base{'s' if len(plan.groups) > 1 else ''} on {len(table.domains)} domain"
              f"{'s' if len(table.domains) > 1 else ''}",
        labels=plan.labels, table=pd.DataFrame(), metrics=outcome.metrics,
        verdict_lines=[f"{d}: {table.best(d)} has the lowest perplexity "
                       f"({table.ppl[d][table.best(d)]:.4g})" for d in table.domains],
        decision="perplexity by domain", decision_class="domains", notes=table.notes,
        primary="ppl", lead_html=domains_section(table))


def log_domains(client, outcome: DomainOutcome) -> str:
    """One new run: the models as params, every figure as a metric, the table and the page."""
    from mlflow.entities import Param

    from tunelens.registry.experiments import experiment_id

    plan = outcome.plan
    uris = [m.uri for m in plan.models if m.uri]
    run_id = client.create_run(
        experiment_id(client, plan.config.evaluation.experiment),
        run_name=f"domains-{'-'.join(m.label for m in plan.models if m.uri)}"[:250]).info.run_id
    client.set_tag(run_id, "tunelens.models", " ".join(uris))
    with closed_when_done(client, run_id, owned=True):
        params = {"tunelens.models": ",".join(uris), "tunelens.labels": ",".join(plan.labels),
                  "tunelens.bases": ",".join(str(g.base_dir) for g in plan.groups),
                  "tunelens.backend": plan.backend.name,
                  "tunelens.domains": ",".join(outcome.table.domains)}
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        log_metrics(client, run_id, outcome.metrics)
        client.log_dict(run_id, outcome.table.to_dict(), DOMAIN_FILE)
        client.log_text(run_id, _page(outcome), MATRIX_REPORT)
    return run_id


def compare_domains(model_uris: list[str], texts, *, config: Settings, base: str | Path | None = None,
                    backend: str | None = None, client=None) -> DomainOutcome:
    """Score registered versions and their bases on text groups (one per domain), with no test set
    and no generation: the domain × model perplexity table, normalised per domain, logged to a new
    MLflow run. Raises TunelensError, before anything is written, for every bad input."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    plan = plan_domains(client, list(model_uris), list(texts), config, base=base, backend=backend)
    logprobs = score_domains(plan)
    metrics = model_perplexities(plan.texts, logprobs, plan.labels)
    table = domain_perplexity(plan.labels, [g.name for g in plan.texts.groups], metrics,
                              _notes(plan))
    outcome = DomainOutcome("", plan, table, metrics | table.metrics())
    return replace(outcome, run_id=log_domains(client, outcome))
