"""compare_versions: several fine-tunes, of one base or several, on one test set; one matrix, each
candidate's own verdict, paired tests between every two, and which one to deploy.

The same four stages as a single evaluation, built from its parts so that a candidate's verdict here
is exactly the verdict `tunelens evaluate` alone would give it on these rows:

* plan: `plan_evaluation` for each candidate (its base, the holder of its model's promotion alias),
  then the union of every model to run, grouped by base, under matrix-wide labels (`base-<dir>` for a
  base when there are several, `v<N>` or `<name>-v<N>` for a version); the rows every model can take
  (the intersection of each plan's rows); one backend for all;
* generate: `run_group` for each base in turn (one engine in memory at a time, never two bases),
  every model on the same prompt ids and generation settings, each group's latency and memory as
  served;
* score: each candidate's plan scored by `score` on a view of the matrix's outputs under that plan's
  own labels (base, finetuned, the holder's alias); paired tests between every two candidates (the
  rows are the same, so they are paired across bases too); the recommendation
  (evaluators.recommendation);
* log: one run (metrics per model, the per-row table with one column per model, the matrix page,
  matrix.json), then each candidate version's verdict, as a single evaluation writes it, pointing at
  that run, with its place in the recommendation.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
from markupsafe import Markup

from tunelens.errors import TunelensError

from tunelens.evaluators.engines.choice import BackendChoice, check_text_scoring, choose_backend
from tunelens.evaluators.engines.interface import Candidate
from tunelens.settings import GenerationSettings, Settings
from tunelens.evaluators.pages.domains import domains_section
from tunelens.evaluators.pages.models_table import ModelColumn, models_side_by_side
from tunelens.evaluators.pages.report import PAGES, render_report
from tunelens.evaluators.pages.texts import html_section, log_text_results
from tunelens.evaluators.scoring.metrics import RowScores
from tunelens.evaluators.scoring.recommendation import Recommendation, Standing, recommend
from tunelens.evaluators.scoring.stats import (ModelScores, PairedComparison, QualityMetricInfo,
                                               compare_paired)
from tunelens.registry.version import parse_model_uri, resolve_version
from tunelens.evaluators.stages.generate import Generated, GroupRun, run_group
from tunelens.evaluators.stages.log import (closed_when_done, log_metrics, log_run_inputs,
                                            machine_tags, tag_version)
from tunelens.evaluators.stages.plan import (BASE, FINETUNED, EngineGroup, EvaluationPlan,
                                             EvaluationRequest, plan_evaluation)
from tunelens.evaluators.stages.score import Scored, build_table, score
from tunelens.evaluators.texts.domain_table import DOMAIN_FILE, DomainPerplexity, domain_perplexity
from tunelens.evaluators.texts.drift import DriftProfile
from tunelens.evaluators.texts.perplexity import TextPlan, plan_texts
from tunelens.evaluators.timing.profiles import ServingFigures
from tunelens.evaluators.timing.rules import compare_latency
from tunelens.evaluators.verdict import Verdict

MATRIX_REPORT = "tunelens/matrix.html"
MATRIX_TABLE = "tunelens/matrix_table.json"
MATRIX_FILE = "tunelens/matrix.json"
# On each candidate version: "recommended", "backup" or "not chosen", in the comparison of the run
# tunelens.eval.run_id names.
RECOMMENDATION_TAG = "tunelens.comparison.role"
RECOMMENDED_TAG, BACKUP_TAG = "tunelens.recommended", "tunelens.backup"  # on the run: model URIs


@dataclass(frozen=True)
class MatrixModel:
    """One row of the matrix: a base, a candidate, or the holder of a candidate's promotion alias."""

    label: str
    role: str  # "base", "candidate" or "holder"
    base_dir: Path
    uri: str | None = None  # models:/NAME/VERSION; None for a base
    adapter_dir: Path | None = None

    @property
    def candidate(self) -> Candidate:
        version = self.uri.rsplit("/", 1)[1] if self.uri else None
        return Candidate(self.label, self.adapter_dir, version)


@dataclass(frozen=True)
class CandidatePlan:
    """A candidate's own evaluation plan (rows and backend those of the matrix) and how its labels
    (base, finetuned, the holder's alias) are called in the matrix."""

    plan: EvaluationPlan
    labels: dict[str, str]  # plan label -> matrix label

    @property
    def label(self) -> str:
        return self.labels[FINETUNED]


@dataclass(frozen=True)
class MatrixPlan:
    candidates: list[CandidatePlan]
    models: list[MatrixModel]
    groups: list[EngineGroup]  # one per base, matrix labels, run in turn
    kept: list[int]
    skipped: int
    backend: BackendChoice
    config: Settings
    texts: TextPlan | None = None  # the text groups, tokenised for every base alike

    @property
    def first(self) -> EvaluationPlan:
        return self.candidates[0].plan

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.models]

    @property
    def bases(self) -> frozenset[str]:
        return frozenset(m.label for m in self.models if m.role == "base")


def metric_safe(text: str) -> str:
    """A label MLflow accepts inside a metric key (letters, digits, _ - and .)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def model_label(name: str, version: str, several_models: bool) -> str:
    """"v<N>", or "<name>-v<N>" when the versions compared belong to several registered models."""
    return metric_safe(f"{name}-v{version}") if several_models else f"v{version}"


def base_labels(base_dirs: list[Path]) -> dict[Path, str]:
    """"base" for one base; "base-<folder>" for several (numbered where two folders share a name)."""
    if len(base_dirs) == 1:
        return {base_dirs[0]: BASE}
    labels: dict[Path, str] = {}
    for base_dir in base_dirs:
        label = f"base-{metric_safe(base_dir.name)}"
        while label in labels.values():
            label += "-2"
        labels[base_dir] = label
    return labels


def distinct_versions(client, model_uris: list[str], at_least: int = 2) -> None:
    """At least `at_least` versions, each listed once (checked before any download)."""
    if len(model_uris) < at_least:
        raise TunelensError("a comparison needs at least two model versions")
    seen: dict[tuple[str, str], str] = {}
    for uri in model_uris:
        name, version, alias = parse_model_uri(uri)
        key = (name, resolve_version(client, name, version or alias))
        if key in seen:
            raise TunelensError(f"{uri} and {seen[key]} are the same version "
                                f"(models:/{key[0]}/{key[1]}): list each version once")
        seen[key] = uri


def _base_dirs(plans: list[EvaluationPlan]) -> list[Path]:
    """Every base of every plan, once (one folder reached by two paths counts once)."""
    base_dirs: list[Path] = []
    for plan in plans:
        for group in plan.groups:
            if not any(b.resolve() == group.base_dir.resolve() for b in base_dirs):
                base_dirs.append(group.base_dir)
    return base_dirs


def _matrix_models(plans: list[EvaluationPlan], base_dirs: list[Path]
                   ) -> tuple[dict[str, MatrixModel], list[CandidatePlan]]:
    """The union of every plan's models under matrix-wide labels, and each candidate's plan with
    its labels as the matrix calls them."""
    several_models = len({plan.ref.name for plan in plans}) > 1

    def same_base(path: Path) -> Path:
        return next(b for b in base_dirs if b.resolve() == path.resolve())

    base_label = base_labels(base_dirs)
    models: dict[str, MatrixModel] = {}
    candidates = []
    for plan in plans:
        own_base = same_base(plan.base_dir)
        labels = {BASE: base_label[own_base],
                  FINETUNED: model_label(plan.ref.name, plan.ref.version, several_models)}
        models.setdefault(labels[BASE], MatrixModel(labels[BASE], "base", own_base))
        # set, not setdefault: a version listed before as another candidate's holder is a candidate
        models[labels[FINETUNED]] = MatrixModel(
            labels[FINETUNED], "candidate", own_base,
            f"models:/{plan.ref.name}/{plan.ref.version}", plan.ref.adapter_dir)
        if plan.holder_label:
            holder = next(c for c in plan.candidates if c.label == plan.holder_label)
            labels[plan.holder_label] = model_label(plan.ref.name, holder.version, several_models)
            holder_base = same_base(plan.base_of(plan.holder_label))
            models.setdefault(base_label[holder_base],
                              MatrixModel(base_label[holder_base], "base", holder_base))
            models.setdefault(labels[plan.holder_label], MatrixModel(
                labels[plan.holder_label], "holder", holder_base,
                f"models:/{plan.ref.name}/{holder.version}", holder.adapter_dir))
        candidates.append(CandidatePlan(replace(plan, names=labels), labels))
    return models, candidates


def _matrix_groups(plans: list[EvaluationPlan], base_dirs: list[Path],
                   models: dict[str, MatrixModel]) -> list[EngineGroup]:
    """One engine group per base, its base first (as run_group expects), then its versions."""
    groups = []
    for base_dir in base_dirs:
        members = [m for m in models.values() if m.base_dir == base_dir]
        members.sort(key=lambda m: m.role != "base")
        source = next(g for plan in plans for g in plan.groups
                      if g.base_dir.resolve() == base_dir.resolve())
        groups.append(EngineGroup(base_dir, [m.candidate for m in members], source.max_model_len,
                                  source.prompt_ids))
    return groups


def plan_matrix(client, model_uris: list[str], request: EvaluationRequest,
                config: Settings) -> MatrixPlan:
    """Check every input of every candidate and decide what runs where; writes nothing.
    `request`: what every candidate is evaluated with (its model_uri is each of `model_uris`)."""
    distinct_versions(client, model_uris)
    # the text groups are planned once for every base below, not once per candidate
    plans = [plan_evaluation(client, replace(request, model_uri=uri, against=(), texts=(),
                                             guard=()), config)
             for uri in model_uris]
    full = [f"{plan.model_uri} ({c.label})" for plan in plans for c in plan.candidates
            if c.label != BASE and c.adapter_dir is None]
    if full:
        raise TunelensError(f"{full[0]} is a full fine-tune: the comparison matrix compares "
                            "adapters; evaluate a full fine-tune alone (tunelens evaluate "
                            "models:/NAME/VERSION --data ...), or its perplexity by domain "
                            "without --data")
    base_dirs = _base_dirs(plans)
    models, candidates = _matrix_models(plans, base_dirs)
    choice = choose_backend(request.backend or config.evaluation.backend,
                            [m.adapter_dir for m in models.values() if m.adapter_dir is not None])
    groups = _matrix_groups(plans, base_dirs, models)
    kept = sorted(set.intersection(*(set(plan.kept) for plan in plans)))
    considered = len(plans[0].kept) + plans[0].skipped
    if not kept:
        raise TunelensError("no row fits every model's context (prompt + max_new_tokens): "
                            "nothing to compare")
    skipped = considered - len(kept)
    # one tokenisation of the text groups for every base, cut to the shortest context of all
    text_plan = plan_texts(request.texts, request.guard, config, base_dirs,
                           min(g.max_model_len for g in groups))
    if text_plan is not None:
        check_text_scoring(choice, [m.adapter_dir for m in models.values() if m.adapter_dir])
    candidates = [replace(c, plan=replace(c.plan, kept=kept, skipped=skipped, backend=choice,
                                          texts=text_plan))
                  for c in candidates]
    ordered = [m for g in groups for m in models.values() if m.label in
               {c.label for c in g.candidates}]
    return MatrixPlan(candidates, ordered, groups, kept, skipped, choice, config, text_plan)


# --- generate ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatrixRuns:
    groups: dict[str, GroupRun]  # by every member's matrix label: its base's engine group
    drift: dict[str, DriftProfile]  # by candidate label, when the text groups measure drift


def generate_matrix(plan: MatrixPlan) -> MatrixRuns:
    """Each base's engine in turn (closed before the next), with its latency and memory as served,
    the text groups' log-probabilities and each of its candidates' activation drift from it (on the
    engine when it is a transformers one, else on one transformers model of the base after it)."""
    first = plan.first
    runs: dict[str, GroupRun] = {}
    drift: dict[str, DriftProfile] = {}
    for group in plan.groups:
        members = {c.label: c for c in group.candidates}
        pairs = (tuple((members[c.labels[BASE]], members[c.label]) for c in plan.candidates
                       if c.label in members)
                 if plan.texts is not None and plan.texts.drift_texts else ())
        done = run_group(group, plan.kept, plan.backend, first.settings, plan.config, serve=True,
                         texts=plan.texts, drift_pairs=pairs,
                         judged=tuple(c.label for c in plan.candidates))
        runs |= {c.label: done for c in group.candidates}
        drift |= done.drift
    return MatrixRuns(runs, drift)


def _view(candidate: CandidatePlan, matrix: MatrixRuns) -> Generated:
    """The matrix's outputs as a single evaluation of this candidate would have them: its own
    labels, latency and memory as served of the models on its base's engine, its text scores and
    drift."""
    runs = matrix.groups
    own = runs[candidate.label]
    phases = {label: replace(runs[matrix_label].phases[matrix_label], label=label)
              for label, matrix_label in candidate.labels.items()}
    serving = own.serving
    if serving is not None:
        named = {matrix_label: label for label, matrix_label in candidate.labels.items()
                 if runs[matrix_label] is own}
        serving = ServingFigures(
            tuple(replace(p, label=named[p.label]) for p in serving.latency if p.label in named),
            tuple(replace(p, label=named[p.label]) for p in serving.memory if p.label in named),
            serving.notes,
            tuple(replace(p, label=named[p.label]) for p in serving.under_load
                  if p.label in named), serving.unmeasured)
    text_logprobs = None
    if own.text_logprobs is not None:
        text_logprobs = {label: runs[matrix_label].text_logprobs[matrix_label]
                         for label, matrix_label in candidate.labels.items()}
    return Generated({label: phases[label] for label in candidate.plan.labels},
                     own.engine_settings, serving, text_logprobs,
                     matrix.drift.get(candidate.label))


# --- score ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatrixScores:
    scored: dict[str, Scored]  # by candidate label: its own evaluation's scores and verdict
    rows: dict[str, RowScores]  # by matrix label
    metrics: dict[str, float]  # matrix labels: `<label>/…`, `<candidate>/delta…/…`, `pairs/…`
    pairs: dict[tuple[str, str], PairedComparison]  # (base label, other label), both orders
    recommendation: Recommendation
    table: pd.DataFrame
    notes: list[str]


def _renamed(metrics: dict[str, float], candidate: CandidatePlan) -> dict[str, float]:
    """A single evaluation's metric names in the matrix's: `finetuned/x` -> `v2/x`,
    `delta/x` -> `v2/delta/x`, `delta_vs_production/x` -> `v2/delta_vs_production/x`,
    `drift/x` -> `v2/drift/x`."""
    out = {}
    for key, value in metrics.items():
        head, _, rest = key.partition("/")
        if head in candidate.labels:
            out[f"{candidate.labels[head]}/{rest}"] = value
        elif head in ("delta", "drift") or head.startswith("delta_vs_"):
            out[f"{candidate.label}/{key}"] = value
        else:
            out[key] = value
    return out


def _standing(candidate: CandidatePlan, scored: Scored, view: Generated, config: Settings) -> Standing:
    """The candidate's verdict, quality and cost as served (None where not measured)."""
    settings = config.verdict
    memory = latency = None
    noise = 1.0
    serving = view.serving
    if serving is not None and serving.unmeasured is None:
        memory = serving.memory_of(FINETUNED).total_bytes
        level = int(settings.latency_at)  # the level the latency rule judges
        profile = serving.at(FINETUNED, level)
        latency = profile.e2e_p50_ms
        noise = compare_latency(serving.at(BASE, level), profile,
                                level=float(settings.confidence_level),
                                n_resamples=int(settings.bootstrap_resamples),
                                seed=int(settings.seed)).noise_bound
    primary = candidate.plan.primary.name
    return Standing(candidate.label, f"models:/{candidate.plan.ref.name}/"
                    f"{candidate.plan.ref.version}", scored.verdict.decision,
                    float(scored.rows[FINETUNED].quality[primary].mean()), memory, latency, noise)


def score_matrix(plan: MatrixPlan, runs: MatrixRuns) -> MatrixScores:
    """Every candidate's own scores and verdict, the paired tests between every two candidates on
    the same rows, and the recommendation."""
    first, config = plan.first, plan.config
    scored: dict[str, Scored] = {}
    rows: dict[str, RowScores] = {}
    metrics: dict[str, float] = {}
    standings = []
    for candidate in plan.candidates:
        view = _view(candidate, runs)
        result = score(candidate.plan, view)
        scored[candidate.label] = result
        rows |= {candidate.labels[label]: value for label, value in result.rows.items()}
        metrics |= _renamed(result.metrics, candidate)
        standings.append(_standing(candidate, result, view, config))
    primary = first.primary
    info = QualityMetricInfo(primary.name, primary.greater_is_better)
    scores = {c.label: ModelScores(c.label, rows[c.label].quality[primary.name],
                                   rows[c.label].words) for c in plan.candidates}
    pairs = {(a, b): compare_paired(scores[a], scores[b], config, info)
             for a, b in itertools.permutations(scores, 2)}
    for a, b in itertools.combinations(scores, 2):
        metrics |= pairs[(a, b)].metrics(f"pairs/{b}_vs_{a}/")
    verdict = config.verdict
    recommendation = recommend(standings, pairs, metric=primary.name,
                               greater_is_better=primary.greater_is_better,
                               margin=float(verdict.noninferiority_margin),
                               same_memory_within=float(verdict.same_memory_within))
    table = build_table(first.dataset, plan.kept, plan.labels, rows, plan.bases)
    settings: GenerationSettings = first.settings
    notes = [f"backend: {plan.backend.name} ({plan.backend.reason}); {len(plan.kept)} rows "
             f"evaluated by every model, {plan.skipped} skipped (too long for a model's context)",
             f"generation: {'greedy' if settings.greedy else f'temperature {settings.temperature}'}"
             f", max {settings.max_new_tokens} new tokens, stop {list(settings.stop)}",
             *(f"engine {i + 1}: {', '.join(c.label for c in g.candidates)} on {g.base_dir}"
               for i, g in enumerate(plan.groups))]
    for group in plan.groups:  # each engine's served-latency note once
        served = runs.groups[group.candidates[0].label].serving
        notes += list(served.notes) if served is not None else []
    return MatrixScores(scored, rows, metrics, pairs, recommendation, table, notes)


# --- log -----------------------------------------------------------------------------------------

def _columns(plan: MatrixPlan, recommendation: Recommendation) -> list[ModelColumn]:
    """Every model of the matrix as the side-by-side table shows it, with what it is suited for:
    a candidate in the recommendation's words, a base or holder as the reference it is."""
    base_of = {m.label: next(b.label for b in plan.models if b.role == "base"
                             and b.base_dir == m.base_dir) for m in plan.models}
    suited = {"base": "the reference its fine-tunes are judged against",
              "holder": f"holds {plan.config.promotion.alias} now: the reference a "
                        "candidate must hold its own against"}
    return [ModelColumn(m.label, base_of[m.label],
                        recommendation.suited_for(m.label) if m.role == "candidate"
                        else suited[m.role]) for m in plan.models]


def domain_table(plan: MatrixPlan, scores: MatrixScores) -> DomainPerplexity | None:
    """Every model's perplexity per text group, normalised per group; None without text groups."""
    if plan.texts is None:
        return None
    return domain_perplexity(plan.labels, [g.name for g in plan.texts.groups], scores.metrics)


def _domains_lead(plan: MatrixPlan, scores: MatrixScores) -> Markup:
    table = domain_table(plan, scores)
    return domains_section(table) if table is not None else Markup("")


def _page(plan: MatrixPlan, scores: MatrixScores) -> str:
    """The matrix page: the recommendation, every candidate's verdict, the paired tests, then the
    side-by-side page's charts, per-model figures and rows with one column per model."""
    primary = plan.first.primary.name
    part_names = ["vs base", "vs holder"]
    verdicts = []
    for candidate in plan.candidates:
        verdict: Verdict = scores.scored[candidate.label].verdict
        parts = {p.against: f"{p.decision.value} (vs {p.reference})"
                 for p in verdict.parts}
        verdicts.append({
            "label": candidate.label, "base": candidate.labels[BASE],
            "decision": verdict.decision.value,
            "css": {"PROMOTE": "ok", "REJECT": "bad"}.get(verdict.decision.value, ""),
            "parts": [parts.get("base", ""), parts.get("holder", "no holder")],
            "rules": [f"{rule.name} {rule.status}: {rule.detail}" for part in verdict.parts
                      for rule in part.deciding()]})
    labels = [c.label for c in plan.candidates]
    pairs = []
    for a in labels:
        cells = []
        for b in labels:
            if a == b:
                cells.append({"text": "", "css": ""})
                continue
            comparison = scores.pairs[(b, a)]  # a minus b
            gain = comparison.quality_delta
            p_value = (f"p = {comparison.mcnemar.p_value:.2g}" if comparison.binary else
                       "BCa")
            significant = comparison.significant_gain()
            cells.append({"text": f"{gain.estimate:+.3f} [{gain.low:+.3f}, {gain.high:+.3f}] "
                                  f"{p_value}",
                          "css": {True: "ok", False: "bad"}.get(significant, "")})
        pairs.append((a, cells))
    level = f"{plan.config.verdict.confidence_level:.0%}"
    per_model = {k: v for k, v in scores.metrics.items() if k.split("/", 1)[0] in plan.labels
                 and "/delta" not in k}
    models = models_side_by_side(_columns(plan, scores.recommendation), per_model)
    section = _domains_lead(plan, scores) + Markup(PAGES.get_template(
        "matrix_section.html").render(part_names=part_names, verdicts=verdicts,
                                      candidates=labels, pairs=pairs, primary=primary,
                                      level=level, models=models))
    recommended = scores.recommendation.recommended
    texts = Markup("").join(
        Markup("<h2>Text groups: {} against its base and holder</h2>").format(c.label)
        + html_section(scores.scored[c.label].texts)
        for c in plan.candidates if scores.scored[c.label].texts is not None)
    return render_report(
        title=f"{len(plan.candidates)} candidates on {len(plan.groups)} base"
              f"{'s' if len(plan.groups) > 1 else ''}: {', '.join(labels)}",
        labels=plan.labels, table=scores.table, metrics=per_model,
        verdict_lines=scores.recommendation.reasons,
        decision=f"recommended: {recommended}" if recommended else "no candidate recommended",
        decision_class="PROMOTE" if recommended else "REJECT", notes=scores.notes,
        primary=primary, lead_html=section, extra_html=texts)


def _role(recommendation: Recommendation, label: str) -> str:
    return ("recommended" if label == recommendation.recommended else
            "backup" if label == recommendation.backup else "not chosen")


def _log_linked_metrics(client, run_id: str, plan: MatrixPlan, scores: MatrixScores,
                        owned: bool) -> None:
    """The matrix's metrics, each candidate's (`<label>/…`) linked to its version's LoggedModel,
    every one to the run's test set."""
    links = log_run_inputs(client, run_id, plan.first, [c.plan.ref for c in plan.candidates],
                           owned)
    metrics = scores.metrics | {"rows_evaluated": float(len(plan.kept)),
                                "rows_skipped_too_long": float(plan.skipped)}
    for candidate, link in zip(plan.candidates, links):
        own = {k: v for k, v in metrics.items() if k.startswith(f"{candidate.label}/")}
        log_metrics(client, run_id, own, link)
        metrics = {k: v for k, v in metrics.items() if k not in own}
    log_metrics(client, run_id, metrics, replace(links[0], model_id=None))


def log_matrix(client, plan: MatrixPlan, scores: MatrixScores, html: str,
               document: dict, run_id: str | None = None) -> str:
    """One run for the comparison (the caller's `run_id`, mlflow.models.evaluate's, or a new one
    we own), then each candidate version's verdict pointing at it (the verdict tag last on each,
    as a single evaluation writes it); returns the run id."""
    from mlflow.entities import Param

    from tunelens.registry.experiments import experiment_id

    evaluation = plan.config.evaluation
    uris = [c.plan.model_uri for c in plan.candidates]
    owned = run_id is None
    if owned:
        run_id = client.create_run(
            experiment_id(client, evaluation.experiment),
            run_name=f"compare-{'-'.join(c.label for c in plan.candidates)}"[:250]).info.run_id
    client.set_tag(run_id, "tunelens.models", " ".join(uris))
    recommendation = scores.recommendation
    named = {c.label: f"models:/{c.plan.ref.name}/{c.plan.ref.version}" for c in plan.candidates}
    with closed_when_done(client, run_id, owned):
        first = plan.first
        params = {"tunelens.models": ",".join(named.values()),
                  "tunelens.labels": ",".join(plan.labels),
                  "tunelens.bases": ",".join(str(g.base_dir) for g in plan.groups),
                  "tunelens.backend": plan.backend.name,
                  "tunelens.primary_metric": first.primary.name,
                  "tunelens.metrics": ",".join(m.name for m in first.metrics),
                  "tunelens.max_new_tokens": first.settings.max_new_tokens,
                  "tunelens.temperature": first.settings.temperature}
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                         tags=machine_tags())
        _log_linked_metrics(client, run_id, plan, scores, owned)
        client.log_table(run_id, data=scores.table, artifact_file=MATRIX_TABLE)
        client.log_text(run_id, html, MATRIX_REPORT)
        client.log_dict(run_id, document, MATRIX_FILE)
        domains = domain_table(plan, scores)
        if domains is not None:
            client.log_dict(run_id, domains.to_dict(), DOMAIN_FILE)
        for candidate in plan.candidates:
            log_text_results(client, run_id, scores.scored[candidate.label].texts,
                             folder=f"tunelens/{candidate.label}")
        for tag, label in ((RECOMMENDED_TAG, recommendation.recommended),
                           (BACKUP_TAG, recommendation.backup)):
            client.set_tag(run_id, tag, named.get(label, "none"))
    for candidate in plan.candidates:
        others = ", ".join(c.label for c in plan.candidates if c is not candidate)
        role = _role(recommendation, candidate.label)
        client.set_model_version_tag(candidate.plan.ref.name, candidate.plan.ref.version,
                                     RECOMMENDATION_TAG, role)
        tag_version(client, candidate.plan, scores.scored[candidate.label], run_id,
                    report_file=MATRIX_REPORT,
                    extra_lines=("", f"Compared with {others} on the same rows: **{role}** "
                                 f"(recommended {recommendation.recommended or 'none'}, backup "
                                 f"{recommendation.backup or 'none'})."))
    return run_id


# --- the whole comparison ------------------------------------------------------------------------

@dataclass(frozen=True)
class MatrixOutcome:
    """What one comparison produced; everything here is also on the MLflow run `run_id`."""

    run_id: str
    plan: MatrixPlan
    scores: MatrixScores
    engine_settings: dict = field(default_factory=dict)

    @property
    def recommendation(self) -> Recommendation:
        return self.scores.recommendation

    def verdict_of(self, label: str) -> Verdict:
        return self.scores.scored[label].verdict

    def to_dict(self) -> dict:
        """The matrix, the verdicts, the recommendation (`tunelens evaluate A B --json`)."""
        plan, scores = self.plan, self.scores
        uris = {m.label: m.uri for m in plan.models if m.uri}
        models = [{"label": m.label, "role": m.role, "model": m.uri, "base": str(m.base_dir),
                   "metrics": {k.split("/", 1)[1]: v for k, v in scores.metrics.items()
                               if k.startswith(f"{m.label}/") and "/delta" not in k}}
                  for m in plan.models]
        verdicts = {c.label: {"model": uris[c.label], "base_label": c.labels[BASE],
                              **self.verdict_of(c.label).to_dict(),
                              "deltas": {k.split("/", 1)[1]: v for k, v in scores.metrics.items()
                                         if k.startswith(f"{c.label}/delta")}}
                    for c in plan.candidates}
        pairs = [{"base": a, "other": b, "metric": comparison.metric,
                  "difference": comparison.quality_delta.estimate,
                  "ci": [comparison.quality_delta.low, comparison.quality_delta.high],
                  "p_value": comparison.mcnemar.p_value if comparison.binary else None,
                  "significant": comparison.significant_gain()}
                 for (a, b), comparison in scores.pairs.items() if a < b]
        return {"run_id": self.run_id, "primary_metric": plan.first.primary.name,
                "rows_evaluated": len(plan.kept), "rows_skipped_too_long": plan.skipped,
                "backend": {"name": plan.backend.name, "reason": plan.backend.reason},
                "models": models, "verdicts": verdicts, "pairs": pairs,
                **self.recommendation.to_dict(uris), "notes": scores.notes}


def compare_versions(model_uris: list[str], data, *, base: str | Path | None = None,
                     config: Settings, backend: str | None = None,
                     max_new_tokens: int | None = None, client=None, extra_metrics=(),
                     primary_metric: str | None = None, texts=(), guard=(),
                     run_id: str | None = None) -> MatrixOutcome:
    """Evaluate several registered versions (bases may differ) side by side on `data`: each gets
    its own two-part verdict (tagged on the version, as `evaluate_version` does), every two are
    compared on the same rows, and one is recommended for deployment with a backup. Raises
    TunelensError, before anything is written, for every bad input. `texts`, `guard`: text groups
    scored for perplexity by every model, as in `evaluate_version`; each candidate's drift from its
    base. `run_id`: log into this run (mlflow.models.evaluate's) instead of a new one."""
    from mlflow import MlflowClient

    request = EvaluationRequest("", data, base=base, backend=backend,
                                max_new_tokens=max_new_tokens, extra_metrics=tuple(extra_metrics),
                                primary_metric=primary_metric, texts=tuple(texts),
                                guard=tuple(guard))
    client = client or MlflowClient()
    plan = plan_matrix(client, list(model_uris), request, config)
    runs = generate_matrix(plan)
    scores = score_matrix(plan, runs)
    outcome = MatrixOutcome("", plan, scores, next(iter(runs.groups.values())).engine_settings)
    html = _page(plan, scores)
    run_id = log_matrix(client, plan, scores, html, outcome.to_dict(), run_id)
    return replace(outcome, run_id=run_id)
