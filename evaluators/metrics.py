"""Per-row scores and per-model summaries: quality metrics, length, latency, the grammar profile's checks."""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

import numpy as np

from .backends import Phase


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


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the word sequences of `a` and `b` (case kept)."""
    x, y = a.split(), b.split()
    previous = list(range(len(y) + 1))
    for i, word in enumerate(x, 1):
        current = [i]
        for j, other in enumerate(y, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


def matches_any(patterns: list[str], text: str) -> bool:
    return any(re.search(p, text, flags=re.IGNORECASE) for p in patterns)


@dataclass(frozen=True)
class GrammarChecks:
    """The grammar profile's per-row checks of one model's outputs."""

    preamble: np.ndarray  # bool: a chatty lead-in ("The corrected sentence is:")
    explanation: np.ndarray  # bool: an explanation or alternatives added
    edits_to_input: np.ndarray  # int: word edits from the input to the output
    edits_to_target: np.ndarray  # int: word edits from the output to the reference
    over_correction: np.ndarray  # bool: wrong, and more edits to the input than the reference made


@dataclass(frozen=True)
class RowScores:
    """One model's per-row values, aligned with the dataset rows that were evaluated."""

    outputs: list[str]
    quality: dict[str, np.ndarray]  # metric name -> float per row
    words: np.ndarray  # int
    tokens: np.ndarray  # int
    identical_to_base: np.ndarray  # bool
    grammar: GrammarChecks | None = None  # only with evaluation.task_profile: grammar


def grammar_checks(outputs: list[str], inputs: list[str], targets: list[str],
                   matched: np.ndarray, behaviour: dict) -> GrammarChecks:
    """Preamble / explanation patterns, word edit distances and over-correction, per row."""
    edits_to_input = np.array([word_edit_distance(i, o) for i, o in zip(inputs, outputs)])
    reference_edits = np.array([word_edit_distance(i, t) for i, t in zip(inputs, targets)])
    return GrammarChecks(
        preamble=np.array([matches_any(behaviour["preamble_patterns"], o.lstrip()[:200])
                           for o in outputs], dtype=bool),
        explanation=np.array([matches_any(behaviour["explanation_patterns"], o) for o in outputs],
                             dtype=bool),
        edits_to_input=edits_to_input,
        edits_to_target=np.array([word_edit_distance(o, t) for o, t in zip(outputs, targets)]),
        over_correction=~matched & (edits_to_input > reference_edits))


def score_rows(phase: Phase, inputs: list[str], targets: list[str], base_outputs: list[str],
               evaluation: dict, metrics, profile=None) -> RowScores:
    """Every per-row value for one model's phase against the targets and the base's outputs.

    `metrics`: the QualityMetric list; `profile`: the TaskProfile (None: no task-specific checks).
    """
    outputs = [g.text for g in phase.generations]
    quality = {metric.name: metric.per_row(outputs, targets, inputs) for metric in metrics}
    grammar = None
    if profile is not None and profile.behaviour_checks:
        matched = exact_match(outputs, targets, **evaluation["exact_match"])
        grammar = grammar_checks(outputs, inputs, targets, matched, evaluation["behaviour"])
    return RowScores(
        outputs=outputs, quality=quality,
        words=np.array([word_count(o) for o in outputs], dtype=int),
        tokens=np.array([g.n_tokens for g in phase.generations], dtype=int),
        identical_to_base=np.array([o == b for o, b in zip(outputs, base_outputs)], dtype=bool),
        grammar=grammar)


def summarize(rows: RowScores, phase: Phase) -> dict[str, float]:
    """The per-model metrics logged under `<label>/` (NaN-free: absent values are left out).

    Latency and memory are not here: they are measured as served (serving.py), never from the batch.
    """
    metrics = {
        **{name: float(values.mean()) for name, values in rows.quality.items()},
        "mean_words": float(rows.words.mean()),
        "median_words": float(np.median(rows.words)),
        "mean_tokens": float(rows.tokens.mean()),
        "batch_tokens_per_s": phase.tokens_per_s,
        "batch_wall_s": phase.wall_s,
        "identical_to_base": float(rows.identical_to_base.mean()),
    }
    if rows.grammar is not None:
        checks = rows.grammar
        metrics |= {"preamble_rate": float(checks.preamble.mean()),
                    "explanation_rate": float(checks.explanation.mean()),
                    "over_correction_rate": float(checks.over_correction.mean()),
                    "mean_edits_to_input": float(checks.edits_to_input.mean()),
                    "mean_edits_to_target": float(checks.edits_to_target.mean())}
    return {k: v for k, v in metrics.items() if not math.isnan(v)}
