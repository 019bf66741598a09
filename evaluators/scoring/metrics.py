"""Per-row scores and per-model summaries: quality metrics, length (also against the expected
answer), the grammar profile's checks (scoring.behaviour)."""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

import numpy as np

from tunelens.evaluators.engines.interface import Phase
from tunelens.evaluators.scoring.behaviour import GrammarChecks, grammar_checks, split_answer
from tunelens.settings import EvaluationSettings


def exact_match(predictions: list[str], references: list[str], *, strip: bool = True,
                ignore_case: bool = False, ignore_punctuation: bool = False,
                ignore_numbers: bool = False, regexes_to_ignore=()) -> np.ndarray:
    """Per-row flags with HF `evaluate`'s exact_match semantics (its mean is the metric).

    Same order as evaluate's: regexes removed, then case, punctuation, digits; two strings that
    normalise to empty match only when they were equal before. `strip` trims whitespace first.
    """
    originals = [(p.strip(), r.strip()) if strip else (p, r) for p, r in zip(predictions, references)]
    drop_punctuation = str.maketrans("", "", string.punctuation)
    drop_digits = str.maketrans("", "", string.digits)

    def normalise(text: str) -> str:
        for pattern in regexes_to_ignore or ():
            text = re.sub(pattern, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(drop_punctuation)
        if ignore_numbers:
            text = text.translate(drop_digits)
        return text

    flags = []
    for prediction, reference in originals:
        p, r = normalise(prediction), normalise(reference)
        flags.append(p == r and (p != "" or prediction == reference))
    return np.array(flags, dtype=bool)


def word_count(text: str) -> int:
    """Whitespace-separated words."""
    return len(text.split())


@dataclass(frozen=True)
class RowScores:
    """One model's per-row values, aligned with the dataset rows that were evaluated."""

    outputs: list[str]
    quality: dict[str, np.ndarray]  # metric name -> float per row
    words: np.ndarray  # int
    target_words: np.ndarray  # int: words of each row's reference answer
    tokens: np.ndarray  # int
    identical_to_base: np.ndarray  # bool
    grammar: GrammarChecks | None = None  # only with evaluation.task_profile: grammar


def score_rows(phase: Phase, inputs: list[str], targets: list[str], base_outputs: list[str],
               evaluation: EvaluationSettings, metrics, profile=None) -> RowScores:
    """Every per-row value for one model's phase against the targets and the base's outputs.

    `metrics`: the QualityMetric list; `profile`: the TaskProfile (None: no task-specific checks).
    """
    outputs = [g.text for g in phase.generations]
    quality = {metric.name: metric.per_row(outputs, targets, inputs) for metric in metrics}
    grammar = None
    if profile is not None and profile.behaviour_checks:
        behaviour = evaluation.behaviour
        answers = [split_answer(o, t, behaviour.preamble_patterns,
                                behaviour.explanation_patterns)
                   for o, t in zip(outputs, targets)]
        correct = exact_match([a.correction for a in answers], targets,
                              **evaluation.exact_match.model_dump())
        grammar = grammar_checks(answers, inputs, targets, correct)
    return RowScores(
        outputs=outputs, quality=quality,
        words=np.array([word_count(o) for o in outputs], dtype=int),
        target_words=np.array([word_count(t) for t in targets], dtype=int),
        tokens=np.array([g.n_tokens for g in phase.generations], dtype=int),
        identical_to_base=np.array([o == b for o, b in zip(outputs, base_outputs)], dtype=bool),
        grammar=grammar)


def words_vs_target(rows: RowScores) -> float:
    """Output length against the expected answer: Σ words of the outputs / Σ words of the targets
    (3.0: three times too long); NaN when the targets hold no words."""
    total = int(rows.target_words.sum())
    return float(rows.words.sum()) / total if total else math.nan


def summarize(rows: RowScores, phase: Phase) -> dict[str, float]:
    """The per-model metrics logged under `<label>/` (NaN-free: absent values are left out).

    Latency and memory are not here: they are measured as served (timing/), never from the batch.
    """
    metrics = {
        **{name: float(values.mean()) for name, values in rows.quality.items()},
        "mean_words": float(rows.words.mean()),
        "median_words": float(np.median(rows.words)),
        "words_vs_target": words_vs_target(rows),
        "mean_tokens": float(rows.tokens.mean()),
        "batch_tokens_per_s": phase.tokens_per_s,
        "batch_wall_s": phase.wall_s,
        "identical_to_base": float(rows.identical_to_base.mean()),
    }
    if rows.grammar is not None:
        checks = rows.grammar
        metrics |= {"preamble_rate": float(checks.preamble.mean()),
                    "explanation_rate": float(checks.explanation.mean()),
                    "correction_exact_match": float(checks.correct.mean()),
                    "over_correction_rate": float(checks.over_correction.mean()),
                    "mean_edits_to_input": float(checks.edits_to_input.mean()),
                    "mean_edits_to_target": float(checks.edits_to_target.mean())}
    return {k: v for k, v in metrics.items() if not math.isnan(v)}
