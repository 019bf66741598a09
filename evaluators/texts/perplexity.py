"""Perplexity of text groups, base vs fine-tune vs holder, on the same tokens.

Every model scores the same token ids (the base tokenizer's, BOS first when the tokenizer has
one): the log-probability of each token given the ones before it, from vLLM's `prompt_logprobs`
on the evaluation's own engine or from a transformers forward pass. From those:

* perplexity of a model on a group = exp(mean negative log-likelihood over every scored token of
  the group's texts);
* per text, its log-perplexity (mean NLL of its tokens); the candidate's change against a
  reference is the paired difference of log-perplexities across texts, with a paired BCa bootstrap
  interval of the mean (`stats.paired_bca`) and a Wilcoxon signed-rank test (scipy) beside it;
* the cumulative per-token delta curve: for each text the running sum over positions of
  candidate NLL - reference NLL, averaged over the texts that reach each position, with a 95 %
  normal band (mean ± 1.96 standard errors across texts).

A guard group ("must not get worse") adds a verdict rule per part: non-inferiority on
log-perplexity, passed when the upper bound of the mean change is at most `texts.margin`.
Long texts keep their first max_model_len - 1 tokens (vLLM needs room for the one token it must
generate); the cut is counted and said in the notes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tunelens.errors import TunelensError

from tunelens.evaluators.scoring.stats import ConfidenceInterval, paired_bca
from tunelens.evaluators.texts.groups import TextGroup, load_groups
from tunelens.evaluators.verdict import RuleOutcome
from tunelens.settings import Settings, VerdictSettings

TEXTS_TABLE_FILE = "tunelens/texts_table.json"
CURVES_FILE = "tunelens/perplexity_curves.png"
BAND_Z = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class TextPlan:
    """The text groups of an evaluation, tokenised for each engine group's base."""

    groups: list[TextGroup]
    margin: float  # log-perplexity (nats per token) a guard group may rise at most
    drift_texts: int  # texts for the activation drift (0: none)
    max_tokens: int  # texts are cut to their first max_tokens tokens
    token_ids: dict[str, list[list[int]]]  # by base folder: every text, groups in order
    cut: dict[str, int]  # texts cut to max_tokens, by group

    def spans(self) -> dict[str, slice]:
        """Where each group's texts sit in the flat list of texts."""
        spans, start = {}, 0
        for group in self.groups:
            spans[group.name] = slice(start, start + len(group.texts))
            start += len(group.texts)
        return spans

    @property
    def texts(self) -> list[str]:
        return [t for group in self.groups for t in group.texts]

    def note(self) -> str:
        cut = ", ".join(f"{n} of {g}" for g, n in self.cut.items() if n)
        return (f"perplexity: {len(self.texts)} texts in {len(self.groups)} group(s) "
                f"({', '.join(g.name + (' (guard)' if g.guard else '') for g in self.groups)}); "
                f"texts longer than {self.max_tokens} tokens keep their first {self.max_tokens} "
                f"(model context - 1): {cut or 'none was'} cut")


def tokenize_texts(base_dir: Path, texts: list[str], max_tokens: int) -> tuple[list[list[int]],
                                                                                 list[bool]]:
    """Token ids of each text (BOS first when the tokenizer has one), cut to `max_tokens`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    bos = tokenizer.bos_token_id
    ids, cut = [], []
    for text in texts:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos is not None:
            tokens = [bos, *tokens]
        cut.append(len(tokens) > max_tokens)
        ids.append(tokens[:max_tokens])
    return ids, cut


def plan_texts(specs, guard, config: Settings, bases: list[Path], max_model_len: int
               ) -> TextPlan | None:
    """Load and tokenise the text groups of conf.yaml's evaluation.texts plus `specs` (CLI,
    evaluator config, model tag); None when there are none. Raises TunelensError on bad input."""
    settings = config.evaluation.texts
    configured = dict(settings.groups or {})
    specs = list(specs or ())
    guard = [*settings.guard, *(guard or ())]
    if not configured and not specs:
        if guard:
            raise TunelensError(f"--guard {', '.join(guard)}: no text groups given (--texts)")
        return None
    groups = load_groups([f"{name}={path}" for name, path in configured.items()] + specs, guard,
                         settings.max_texts)
    texts = [t for group in groups for t in group.texts]
    max_tokens = max_model_len - 1
    token_ids, cut_flags = {}, None
    for base in bases:
        token_ids[str(base)], flags = tokenize_texts(base, texts, max_tokens)
        cut_flags = cut_flags or flags
    spans, start = {}, 0
    for group in groups:
        spans[group.name] = sum(cut_flags[start:start + len(group.texts)])
        for index, ids in enumerate(next(iter(token_ids.values()))[start:start + len(group.texts)]):
            if len(ids) < 2:
                raise TunelensError(f"text {index + 1} of group {group.name!r} is one token and "
                                    "the tokenizer has no BOS token to predict it from: nothing "
                                    "to score")
        start += len(group.texts)
    return TextPlan(groups, float(settings.margin), int(settings.drift_texts), max_tokens,
                    token_ids, spans)


def score_texts(engine, candidates, plan: TextPlan, base_dir: Path
                ) -> dict[str, list[np.ndarray]]:
    """Per model label, the log-probability of every scored token of every text (engine's pass)."""
    ids = plan.token_ids[str(base_dir)]
    return {c.label: engine.token_logprobs(c, ids) for c in candidates}


# --- statistics ----------------------------------------------------------------------------------

def mean_nll(logprobs: list[np.ndarray]) -> np.ndarray:
    """Per text, its log-perplexity: -(1/T) Σ_t log p(x_t | x_<t)."""
    return np.array([-float(lp.mean()) if lp.size else math.nan for lp in logprobs])


def group_perplexity(logprobs: list[np.ndarray]) -> float:
    """exp(-Σ_texts Σ_t log p / Σ_texts T): every token of the group weighs the same."""
    tokens = sum(lp.size for lp in logprobs)
    return math.exp(-sum(float(lp.sum()) for lp in logprobs) / tokens) if tokens else math.nan


@dataclass(frozen=True)
class DeltaCurve:
    """Mean over texts of the running sum of per-token NLL differences, with a 95 % band."""

    mean: np.ndarray  # index t: tokens 1..t+1 of each text (nats)
    low: np.ndarray
    high: np.ndarray
    texts: np.ndarray  # how many texts reach each position


def cumulative_delta_curve(reference: list[np.ndarray], other: list[np.ndarray],
                           min_texts: int = 2) -> DeltaCurve:
    """c_i(t) = Σ_{s≤t} (nll_other_i(s) - nll_ref_i(s)); mean_i c_i(t) ± 1.96·sd/√n, over the
    texts that reach t, up to the last position at least `min_texts` texts reach (one text: all)."""
    sums = [np.cumsum(-(o - r)) for r, o in zip(reference, other)]
    length = max((s.size for s in sums), default=0)
    need = min(min_texts, len(sums))
    mean, low, high, counts = [], [], [], []
    for t in range(length):
        values = np.array([s[t] for s in sums if s.size > t])
        if values.size < need:
            break
        spread = BAND_Z * values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else 0.0
        mean.append(values.mean())
        low.append(values.mean() - spread)
        high.append(values.mean() + spread)
        counts.append(values.size)
    return DeltaCurve(np.array(mean), np.array(low), np.array(high), np.array(counts))


@dataclass(frozen=True)
class PerplexityComparison:
    """`other` against `reference` on one group: per-text log-perplexity differences."""

    group: str
    reference: str
    other: str
    n_texts: int
    tokens: int
    ppl_reference: float
    ppl_other: float
    delta: ConfidenceInterval  # mean over texts of log-ppl(other) - log-ppl(reference), BCa
    constant: bool  # every text changed by the same amount: no spread for the bootstrap
    wilcoxon_p: float  # two-sided Wilcoxon signed-rank on the per-text differences (NaN: all 0)
    curve: DeltaCurve
    guard: bool

    def metrics(self) -> dict[str, float]:
        name = f"log_ppl_{self.group}"
        return {name: self.delta.estimate, f"{name}_ci_low": self.delta.low,
                f"{name}_ci_high": self.delta.high, f"{name}_wilcoxon_p": self.wilcoxon_p,
                f"ppl_ratio_{self.group}": self.ppl_other / self.ppl_reference}


def compare_group(group: TextGroup, reference: str, other: str,
                  ref_logprobs: list[np.ndarray], other_logprobs: list[np.ndarray],
                  settings: VerdictSettings) -> PerplexityComparison:
    """The paired comparison of two models' per-text log-perplexities on one group."""
    from scipy.stats import wilcoxon

    ref_nll, other_nll = mean_nll(ref_logprobs), mean_nll(other_logprobs)
    differences = other_nll - ref_nll
    level = float(settings.confidence_level)
    constant = len(differences) < 2 or float(np.ptp(differences)) <= 1e-12
    if len(differences) < 2:
        delta = ConfidenceInterval(float(differences.mean()), math.nan, math.nan, level)
    else:
        delta = paired_bca(ref_nll, other_nll, n_resamples=int(settings.bootstrap_resamples),
                           level=level, seed=int(settings.seed))
    p_value = math.nan
    if np.any(differences != 0):
        p_value = float(wilcoxon(differences, zero_method="wilcox").pvalue)
    return PerplexityComparison(
        group.name, reference, other, len(differences), sum(lp.size for lp in other_logprobs),
        group_perplexity(ref_logprobs), group_perplexity(other_logprobs), delta, constant,
        p_value, cumulative_delta_curve(ref_logprobs, other_logprobs), group.guard)


def perplexity_rule(comparison: PerplexityComparison, margin: float) -> RuleOutcome:
    """Non-inferiority on log-perplexity: pass when the upper bound of the mean per-text change
    is ≤ margin, fail when its lower bound is > margin, else undecided. When every text changed
    by the same amount the change is known exactly on these texts and decides alone."""
    c, estimate = comparison, comparison.delta.estimate
    low, high = (estimate, estimate) if c.constant else (c.delta.low, c.delta.high)
    if c.n_texts < 2:
        passed, interval = None, "one text only: no interval"
    else:
        passed = True if high <= margin else False if low > margin else None
        interval = ("every text changed by the same amount" if c.constant else
                    f"{c.delta.level:.0%} paired BCa CI {low:+.4f} to {high:+.4f}")
    why = {True: f"not worse: the upper bound is within +{margin:g}",
           False: f"worse: the whole interval is above +{margin:g}",
           None: f"undecided: the interval reaches above +{margin:g}"}[passed]
    wilcoxon = ("Wilcoxon p=n/a (no text changed)" if math.isnan(c.wilcoxon_p)
                else f"Wilcoxon p={c.wilcoxon_p:.3g}")
    detail = (f"{why}; perplexity of {c.group!r} {c.ppl_reference:.4g} -> {c.ppl_other:.4g}, "
              f"mean per-text log-perplexity change {estimate:+.4f} nats/token ({interval}; "
              f"{wilcoxon}; {c.n_texts} texts, {c.tokens} tokens)")
    return RuleOutcome(f"perplexity_{c.group}", estimate, margin, passed, detail)


@dataclass(frozen=True)
class TextResults:
    """Everything the perplexity pass produced, ready to log."""

    plan: TextPlan
    logprobs: dict[str, list[np.ndarray]]  # by label: per text
    comparisons: dict[str, list[PerplexityComparison]]  # by reference label ("base", holder…)
    metrics: dict[str, float]
    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    drift: object | None = None  # drift.DriftProfile, when computed

    def rules(self, reference: str) -> list[RuleOutcome]:
        """The guard groups' rules of the part against `reference` (undecided when not scored)."""
        margin = self.plan.margin
        found = {c.group: c for c in self.comparisons.get(reference, [])}
        rules = []
        for group in self.plan.groups:
            if not group.guard:
                continue
            if group.name in found:
                rules.append(perplexity_rule(found[group.name], margin))
            else:
                rules.append(RuleOutcome(f"perplexity_{group.name}", None, margin, None,
                                         f"{reference} was not scored on the same tokens "
                                         "(another base's tokenizer), so this rule cannot decide"))
        return rules


def model_perplexities(plan: TextPlan, logprobs: dict[str, list[np.ndarray]],
                       labels: list[str]) -> dict[str, float]:
    """`<label>/ppl_<group>` and `<label>/nll_<group>` (its log: mean NLL per token) per model."""
    spans = plan.spans()
    metrics: dict[str, float] = {}
    for label in labels:
        for group in plan.groups:
            perplexity = group_perplexity(logprobs[label][spans[group.name]])
            metrics[f"{label}/ppl_{group.name}"] = perplexity
            metrics[f"{label}/nll_{group.name}"] = math.log(perplexity)
    return metrics


def summarize_texts(plan: TextPlan, logprobs: dict[str, list[np.ndarray]], labels: list[str],
                    candidate: str, references: list[str], same_tokens: set[str],
                    settings: VerdictSettings) -> TextResults:
    """Per model and group perplexity, candidate-vs-reference comparisons, the per-text table."""
    spans = plan.spans()
    metrics = model_perplexities(plan, logprobs, labels)
    comparisons: dict[str, list[PerplexityComparison]] = {}
    notes = [plan.note()]
    for reference in references:
        if reference not in same_tokens:
            notes.append(f"perplexity vs {reference}: another base's tokenizer splits the texts "
                         "differently, so no per-text comparison is made")
            continue
        prefix = "delta/" if reference == references[0] else f"delta_vs_{reference}/"
        comparisons[reference] = []
        for group in plan.groups:
            span = spans[group.name]
            comparison = compare_group(group, reference, candidate, logprobs[reference][span],
                                       logprobs[candidate][span], settings)
            comparisons[reference].append(comparison)
            metrics |= {f"{prefix}{k}": v for k, v in comparison.metrics().items()}
    rows = []
    for group in plan.groups:
        span = spans[group.name]
        for index, text in enumerate(group.texts):
            flat = span.start + index
            row = {"group": group.name, "text": index, "tokens": int(
                logprobs[labels[0]][flat].size), "preview": text[:200]}
            for label in labels:
                row[f"{label}_log_ppl"] = float(-logprobs[label][flat].mean())
            for reference in comparisons:
                row[f"delta_vs_{reference}"] = row[f"{candidate}_log_ppl"] - \
                    row[f"{reference}_log_ppl"]
            rows.append(row)
    return TextResults(plan, logprobs, comparisons, metrics, pd.DataFrame(rows), notes)


def same_token_labels(plan: TextPlan, groups, base_dir: Path) -> set[str]:
    """Labels of the models whose base tokenises the texts as the candidate's base does."""
    reference = plan.token_ids[str(base_dir)]
    return {c.label for g in groups for c in g.candidates
            if plan.token_ids[str(g.base_dir)] == reference}
