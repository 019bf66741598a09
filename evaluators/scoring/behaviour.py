"""The grammar profile's behaviour checks: an answer taken apart into its lead-in, the correction
and the explanation after it, and the checks made on the correction itself.

A chatty answer ("The corrected sentence is: She goes home. Explanation: the verb agrees with its
subject.") holds a right correction: over-correction and exact match are judged on the correction
alone, so the chatter counts once, as a preamble, an explanation and in the words per output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# A sentence ends at . ! or ? (closing quotes or brackets may follow) before whitespace, or at a
# line break; the next sentence starts where the match ends.
_SENTENCE_BREAK = re.compile(r"[.!?][\"'”’)\]]*\s+|\s*\n\s*")
# After a preamble's opening words, the rest of the lead-in runs on to a colon or to the line's end
# ("Here is the corrected sentence:", "Sure, here you go.\n").
_LEAD_IN_REST = re.compile(r"[^.!?\n:]*(?::|[.!?]?[ \t]*\n)")
_LEAD_IN_PUNCTUATION = " \t\r\n,.!:;-–—"
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»"}


@dataclass(frozen=True)
class Answer:
    """One output taken apart; `preamble + correction + explanation` is the output, less the
    whitespace, punctuation and quotes around the correction."""

    preamble: str
    correction: str
    explanation: str


def sentence_starts(text: str) -> list[int]:
    """Where each sentence of `text` starts (0 first): after . ! ? and whitespace, or a line break."""
    starts = [0] + [m.end() for m in _SENTENCE_BREAK.finditer(text)]
    return [s for s in starts if s < len(text) or s == 0]


def _take_preamble(text: str, patterns: list[str]) -> tuple[str, str]:
    """(lead-in, rest): preamble patterns matched at the start, repeatedly ("Sure! Here is the
    corrected sentence: ..."), each with the rest of its lead-in up to a colon or the line's end."""
    rest = text.lstrip()
    while True:
        match = next((m for p in patterns
                      if (m := re.match(p, rest, flags=re.IGNORECASE)) and m.end() > 0), None)
        if match is None:
            return text[:len(text) - len(rest)], rest
        after = rest[match.end():]
        lead_in = _LEAD_IN_REST.match(after)
        if lead_in:
            after = after[lead_in.end():]
        rest = after.lstrip(_LEAD_IN_PUNCTUATION)


def _unquoted(text: str) -> str:
    """`text` without one pair of quotes around all of it."""
    if len(text) > 1 and _QUOTES.get(text[0]) == text[-1]:
        return text[1:-1].strip()
    return text


def split_answer(output: str, reference: str, preamble_patterns: list[str],
                 explanation_patterns: list[str]) -> Answer:
    """The lead-in (preamble patterns at the start), the explanation (from the first sentence that
    matches an explanation pattern, never among as many leading sentences as the reference has:
    a right correction may say "because" too) and the correction between them (quotes around it
    dropped when the answer was chatty)."""
    preamble, rest = _take_preamble(output, preamble_patterns)
    keep = max(1, len(sentence_starts(reference.strip())))
    starts = sentence_starts(rest) + [len(rest)]
    cut = len(rest)
    for start, end in zip(starts[keep:-1], starts[keep + 1:]):
        if any(re.search(p, rest[start:end], flags=re.IGNORECASE) for p in explanation_patterns):
            cut = start
            break
    correction, explanation = rest[:cut].strip(), rest[cut:].strip()
    if preamble or explanation:
        correction = _unquoted(correction)
    return Answer(preamble.strip(), correction, explanation)


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


@dataclass(frozen=True)
class GrammarChecks:
    """The grammar profile's per-row checks of one model's outputs, made on each correction."""

    corrections: list[str]  # each output less its preamble and explanation
    preamble: np.ndarray  # bool: a chatty lead-in ("The corrected sentence is:") was taken off
    explanation: np.ndarray  # bool: an explanation after the correction was taken off
    correct: np.ndarray  # bool: the correction is the reference (exact match's options)
    edits_to_input: np.ndarray  # int: word edits from the input to the correction
    edits_to_target: np.ndarray  # int: word edits from the correction to the reference
    over_correction: np.ndarray  # bool: not correct, and more edits to the input than the reference


def grammar_checks(answers: list[Answer], inputs: list[str], targets: list[str],
                   correct: np.ndarray) -> GrammarChecks:
    """Per row: over-correction = ¬correct ∧ edits(input, correction) > edits(input, reference)."""
    corrections = [a.correction for a in answers]
    edits_to_input = np.array([word_edit_distance(i, c) for i, c in zip(inputs, corrections)],
                              dtype=int)
    reference_edits = np.array([word_edit_distance(i, t) for i, t in zip(inputs, targets)],
                               dtype=int)
    correct = np.asarray(correct, dtype=bool)
    return GrammarChecks(
        corrections=corrections,
        preamble=np.array([bool(a.preamble) for a in answers], dtype=bool),
        explanation=np.array([bool(a.explanation) for a in answers], dtype=bool),
        correct=correct, edits_to_input=edits_to_input,
        edits_to_target=np.array([word_edit_distance(c, t) for c, t in zip(corrections, targets)],
                                 dtype=int),
        over_correction=~correct & (edits_to_input > reference_edits))
