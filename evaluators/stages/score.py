"""The scoring stage: per-row scores, per-model metrics, the paired comparisons and the two-part
verdict, from a plan and its generated outputs.

`score` gives a single evaluation's `Scored`; the comparison matrix scores each candidate with the
same `score` on a view of its outputs under that candidate's own labels, so its verdict is the
one a single evaluation would give.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from tunelens.registry.datasets import EvalDataset
from tunelens.evaluators.pages.load import html_section as load_section
from tunelens.evaluators.pages.report import render_report
from tunelens.evaluators.pages.texts import html_section
from tunelens.evaluators.scoring.metrics import RowScores, score_rows, summarize
from tunelens.evaluators.scoring.stats import (ModelScores, PairedComparison, QualityMetricInfo,
                                               compare_paired)
from tunelens.evaluators.stages.generate import Generated
from tunelens.evaluators.stages.plan import BASE, FINETUNED, EvaluationPlan
from tunelens.evaluators.texts.perplexity import TextResults, same_token_labels, summarize_texts
from tunelens.evaluators.timing.profiles import ServingFigures
from tunelens.evaluators.timing.rules import latency_rule, memory_rules
from tunelens.evaluators.verdict import (RuleOutcome, Verdict, VerdictPart, combine, decide_part,
                                         unmeasured)
from tunelens.settings import Settings, VerdictSettings


@dataclass(frozen=True)
class Scored:
    rows: dict[str, RowScores]
    metrics: dict[str, float]
    comparison: PairedComparison  # finetuned vs base
    other_comparisons: dict[str, PairedComparison]  # finetuned vs the holder and each --against
    verdict: Verdict
    table: pd.DataFrame
    notes: list[str]
    html: str
    texts: TextResults | None = None


def build_table(dataset: EvalDataset, kept: list[int], labels: list[str],
                rows: dict[str, RowScores], bases: frozenset[str] = frozenset({BASE})
                ) -> pd.DataFrame:
    """One line per evaluated row: input, target, and each model's output and scores; every
    label but the `bases` gets a column saying where it answered exactly as its base."""
    table = {"row": kept, "input": [dataset.inputs[i] for i in kept],
             "target": [dataset.targets[i] for i in kept]}
    for label in labels:
        r = rows[label]
        table[f"{label}_output"] = r.outputs
        table |= {f"{label}_{name}": (values.astype(bool) if name == "exact_match" else
                                      np.round(values, 4)).tolist()
                  for name, values in r.quality.items()}
        table |= {f"{label}_words": r.words.tolist(), f"{label}_tokens": r.tokens.tolist()}
        if r.grammar is not None:
            table |= {f"{label}_correction": r.grammar.corrections,
                      f"{label}_preamble": r.grammar.preamble.tolist(),
                      f"{label}_explanation": r.grammar.explanation.tolist(),
                      f"{label}_over_correction": r.grammar.over_correction.tolist()}
        if label not in bases:
            table[f"{label}_identical_to_base"] = r.identical_to_base.tolist()
    return pd.DataFrame(table)


def _served_rules(serving: ServingFigures | None, reference: str, config: Settings,
                  called=lambda label: label) -> list:
    """The rules from latency and memory as served: memory totals
    of the candidate against `reference`, and the served latency ratio against it (request by
    request on the same rows, with the base timed before and after as the noise floor). Nothing
    when `reference` was not served here (sample_rows 0, or the holder on another base): then each
    limit that is set gets an undecided rule saying so, never a batch queue time or a process's
    RSS in place of a figure as served. The rules' texts call each model `called(label)`."""
    settings = config.verdict
    served = set() if serving is None else {p.label for p in serving.memory}
    unserved = next((label for label in (FINETUNED, reference) if label not in served), None)
    if serving is None or unserved is not None:
        why = ("evaluation.latency.sample_rows is 0" if serving is None else
               serving.unmeasured if serving.unmeasured is not None else
               f"{called(unserved)} ran on an engine of its own (another base, or a full "
               "fine-tune) and was not timed as served")
        return _not_served(settings, why)

    def latency(label):
        return replace(serving.at(label, int(settings.latency_at)), label=called(label))

    def memory(label):
        return replace(serving.memory_of(label), label=called(label))

    rules = memory_rules(memory(reference), memory(FINETUNED),
                         settings.max_memory_ratio, settings.max_memory_gib)
    if settings.max_latency_ratio is not None:
        rules.insert(0, latency_rule(
            latency(BASE), latency(FINETUNED),
            float(settings.max_latency_ratio), level=float(settings.confidence_level),
            n_resamples=int(settings.bootstrap_resamples), seed=int(settings.seed),
            reference=None if reference == BASE else latency(reference),
            max_core_wait=config.evaluation.latency.max_core_wait))
    return rules


def _not_served(settings: VerdictSettings, why: str) -> list[RuleOutcome]:
    """Undecided latency and memory rules, for each limit conf.yaml sets, saying why."""
    limits = {"latency_ratio": settings.max_latency_ratio,
              "memory_ratio": settings.max_memory_ratio, "memory_gib": settings.max_memory_gib}
    return [RuleOutcome(name, None, float(limit), None,
                        f"{name.split('_')[0]} as served not measured ({why}), so this rule cannot "
                        f"decide; set its limit to null in conf.yaml to skip it")
            for name, limit in limits.items() if limit is not None]


def _rule_metrics(rules: list[RuleOutcome], prefix: str) -> dict[str, float]:
    """The measured figure of each served rule (`latency_ratio`, `memory_ratio`, `memory_gib`) as a
    metric, so `verdict.metric_thresholds` can check the same numbers the verdict judged."""
    return {f"{prefix}{rule.name}": float(rule.observed) for rule in rules
            if rule.observed is not None and math.isfinite(rule.observed)}


def _texts(plan: EvaluationPlan, generated: Generated) -> TextResults | None:
    """Perplexity per model and group, the paired comparisons and the drift, when texts ran."""
    if plan.texts is None:
        return None
    same = same_token_labels(plan.texts, plan.groups, plan.base_dir)
    results = summarize_texts(plan.texts, generated.text_logprobs, plan.labels, FINETUNED,
                              [label for label in plan.labels if label != FINETUNED], same,
                              plan.config.verdict)
    if generated.drift is not None:
        results.metrics.update(generated.drift.metrics())
        results = replace(results, drift=generated.drift)
    return results


def _per_model(plan: EvaluationPlan, generated: Generated
               ) -> tuple[dict[str, RowScores], dict[str, float], dict[str, ModelScores]]:
    """Every model's per-row scores, its summary metrics `<label>/…`, and its primary metric's
    scores for the paired tests."""
    evaluation = plan.config.evaluation
    inputs = [plan.dataset.inputs[i] for i in plan.kept]
    targets = [plan.dataset.targets[i] for i in plan.kept]
    phases = generated.phases
    base_outputs = [g.text for g in phases[BASE].generations]
    rows = {label: score_rows(phases[label], inputs, targets, base_outputs, evaluation,
                              plan.metrics, plan.profile) for label in plan.labels}
    metrics: dict[str, float] = {}
    scores = {}
    for label in plan.labels:
        metrics |= {f"{label}/{k}": v for k, v in summarize(rows[label], phases[label]).items()}
        scores[label] = ModelScores(plan.called(label), rows[label].quality[plan.primary.name],
                                    rows[label].words)
    return rows, metrics, scores


def _verdict_parts(plan: EvaluationPlan, serving: ServingFigures | None,
                   comparison: PairedComparison, other_comparisons: dict[str, PairedComparison],
                   texts: TextResults | None, metrics: dict[str, float]) -> list[VerdictPart]:
    """The part against the base and, when the alias's holder is compared, the part against it:
    quality, the rules as served and the text groups' rules; each served rule's figure is added
    to `metrics`."""
    config = plan.config
    text_rules = texts.rules if texts is not None else (lambda reference: [])
    served_vs_base = _served_rules(serving, BASE, config, plan.called)
    metrics |= _rule_metrics(served_vs_base, "delta/")
    parts = [decide_part(comparison, config, "base", served_vs_base + text_rules(BASE))]
    if plan.holder_label:
        served_vs_holder = _served_rules(serving, plan.holder_label, config, plan.called)
        metrics |= _rule_metrics(served_vs_holder, f"delta_vs_{plan.holder_label}/")
        parts.append(decide_part(other_comparisons[plan.holder_label], config, "holder",
                                 served_vs_holder + text_rules(plan.holder_label)))
    return parts


def _notes(plan: EvaluationPlan, comparison: PairedComparison, serving: ServingFigures | None,
           texts: TextResults | None, metrics: dict[str, float]) -> list[str]:
    """How the evaluation ran, in sentences: model, backend, rows, generation, holder, and the
    notes of the plan, the timing and the text groups."""
    ref, settings, holder = plan.ref, plan.settings, plan.holder
    max_len = min(g.max_model_len for g in plan.groups)
    notes = [f"model: {ref.uri}; base: {plan.base_dir}",
             f"backend: {plan.backend.name} ({plan.backend.reason}); {len(plan.kept)} rows "
             f"evaluated, {plan.skipped} skipped (prompt + {settings.max_new_tokens} new tokens > "
             f"max_model_len {max_len})",
             f"generation: {'greedy' if settings.greedy else f'temperature {settings.temperature}'}"
             f", max {settings.max_new_tokens} new tokens, stop {list(settings.stop)}",
             ("holder: none looked at (a local candidate)" if holder is None else
              f"holder: {holder.alias} is "
              + (f"v{holder.version}, compared as {plan.holder_label!r}" if plan.holder_label
                 else "this version itself" if holder.version else "held by no version"))
             + f"; primary metric {plan.primary.name} ({comparison.test_name})",
             *plan.notes, *(serving.notes if serving is not None else ()),
             *(texts.notes if texts is not None else ())]
    for label in plan.labels[1:]:
        if metrics[f"{label}/identical_to_base"] == 1.0 and plan.base_of(label) == plan.base_dir:
            notes.append(f"{label} gave exactly the base's output on every row: the adapter "
                         "changed nothing here (untrained, or its scale is ~0)")
    return notes


def _page(plan: EvaluationPlan, table: pd.DataFrame, metrics: dict[str, float], verdict: Verdict,
          notes: list[str], texts: TextResults | None) -> str:
    """side_by_side.html: the verdict, its rules, the charts and every row."""
    ref = plan.ref
    parts_named = {"base": "vs base", "holder": f"vs {plan.holder_label}"}
    return render_report(title=f"{ref.title}: side by side with its base"
                         + (f" and {plan.holder_label}" if plan.holder_label else ""),
                         labels=plan.labels, table=table, metrics=metrics,
                         verdict_lines=[f"{parts_named[p.against]} {p.decision.value}: {r.name}: "
                                        f"{r.status} ({r.detail})"
                                        for p in verdict.parts for r in p.rules]
                         + [f"warning: {w}" for w in verdict.warnings],
                         decision=verdict.decision.value, notes=notes, primary=plan.primary.name,
                         extra_html=load_section(plan.labels, metrics) + html_section(texts))


def score(plan: EvaluationPlan, generated: Generated) -> Scored:
    """Per-row scores, per-model metrics, the paired comparisons and the two-part verdict."""
    config = plan.config
    rows, metrics, scores = _per_model(plan, generated)
    info = QualityMetricInfo(plan.primary.name, plan.primary.greater_is_better)
    comparison = compare_paired(scores[BASE], scores[FINETUNED], config, info)
    metrics |= comparison.metrics("delta/")
    other_comparisons = {label: compare_paired(scores[label], scores[FINETUNED], config, info)
                         for label in plan.labels if label not in (BASE, FINETUNED)}
    for label, other in other_comparisons.items():
        metrics |= other.metrics(f"delta_vs_{label}/")
    serving = generated.serving
    if serving is not None:
        for profile in (*serving.latency, *serving.memory):
            metrics |= {f"{profile.label}/{k}": v for k, v in profile.metrics().items()}
        for profile in serving.every_level():
            metrics |= {f"{profile.label}/{k}": v for k, v in profile.load_metrics().items()}
    texts = _texts(plan, generated)
    if texts is not None:
        metrics |= texts.metrics
    parts = _verdict_parts(plan, serving, comparison, other_comparisons, texts, metrics)
    verdict = combine(plan.called(FINETUNED), len(plan.kept), parts, plan.holder)
    metrics |= {"rows_evaluated": float(len(plan.kept)),
                "rows_skipped_too_long": float(plan.skipped)}
    table = build_table(plan.dataset, plan.kept, plan.labels, rows)
    notes = _notes(plan, comparison, serving, texts, metrics)
    html = _page(plan, table, metrics, verdict, notes, texts)
    return Scored(rows, metrics, comparison, other_comparisons, verdict, table, notes, html, texts)


def unmeasured_verdict(plan: EvaluationPlan, reason: str) -> Verdict:
    """The verdict of an evaluation whose models gave no output (`reason`: why not): INCONCLUSIVE
    against the base and against the alias's holder when it is compared."""
    references = {"base": BASE, **({"holder": plan.holder_label} if plan.holder_label else {})}
    return unmeasured(plan.called(FINETUNED), references, reason, plan.holder)
