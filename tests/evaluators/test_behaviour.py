"""The grammar profile's checks on hand-made answers: the correction taken out of a chatty answer,
over-correction and exact match judged on it, verbosity and output length as their own figures."""
from __future__ import annotations

import numpy as np
import pytest

from tunelens.config import load_config
from tunelens.evaluators.engines.interface import Generation, Phase
from tunelens.evaluators.scoring.behaviour import sentence_starts, split_answer
from tunelens.evaluators.scoring.metrics import score_rows, summarize
from tunelens.evaluators.scoring.profiles import PROFILES

EVALUATION = load_config().evaluation
PATTERNS = (EVALUATION.behaviour.preamble_patterns, EVALUATION.behaviour.explanation_patterns)
REFERENCE = "She goes home."

# (output, reference, preamble, correction, explanation), with conf.yaml's packaged patterns
ANSWERS = [
    ("She goes home.", REFERENCE, "", "She goes home.", ""),
    (" The corrected sentence is: She goes home. Explanation: The verb must agree with its "
     "subject.", REFERENCE, "The corrected sentence is:", "She goes home.",
     "Explanation: The verb must agree with its subject."),
    ("Sure! Here is the corrected sentence:\n\n\"She goes home.\"\n\nThis is because 'she' is "
     "singular.", REFERENCE, "Sure! Here is the corrected sentence:", "She goes home.",
     "This is because 'she' is singular."),
    ("Here's the corrected version.\nShe goes home.", REFERENCE,
     "Here's the corrected version.", "She goes home.", ""),
    ("Certainly, she goes home.", REFERENCE, "Certainly,", "she goes home.", ""),
    ("Corrected: “She goes home.” However, 'She is going home.' also works.", REFERENCE,
     "Corrected:", "She goes home.", "However, 'She is going home.' also works."),
    # a right correction that says "because" itself keeps it: the reference has one sentence
    ("She left because it rained.", "She left because it rained.", "", "She left because it "
     "rained.", ""),
    # two sentences in the reference: the second one may say "however"
    ("I went out. However, it rained. The reason: the verb tense.", "I went out. However, it "
     "rained.", "", "I went out. However, it rained.", "The reason: the verb tense."),
    # quotes are kept when the answer is not chatty
    ('"She goes home."', REFERENCE, "", '"She goes home."', ""),
]


@pytest.mark.parametrize("output, reference, preamble, correction, explanation", ANSWERS)
def test_the_correction_is_taken_out_of_the_answer(output, reference, preamble, correction,
                                                   explanation):
    answer = split_answer(output, reference, *PATTERNS)
    assert (answer.preamble, answer.correction, answer.explanation) == (
        preamble, correction, explanation)


def test_sentences_start_after_end_punctuation_or_a_line_break():
    text = 'One. "Two!" Three?\nfour'
    assert [text[s:] for s in sentence_starts(text)] == [
        text, '"Two!" Three?\nfour', "Three?\nfour", "four"]
    assert sentence_starts("") == [0] and sentence_starts("No break here") == [0]


def _rows(outputs, inputs, targets):
    phase = Phase("m", tuple(Generation(o, tuple(range(len(o.split())))) for o in outputs), 1.0)
    rows = score_rows(phase, inputs, targets, outputs, EVALUATION, [], PROFILES["grammar"])
    return rows, summarize(rows, phase)


def test_a_chatty_but_correct_answer_is_no_over_correction():
    inputs = ["She go home.", "They was late.", "He have a cat."]
    targets = ["She goes home.", "They were late.", "He has a cat."]
    outputs = [f"The corrected sentence is: {t} Explanation: the verb must agree with its "
               "subject." for t in targets]
    rows, metrics = _rows(outputs, inputs, targets)
    assert rows.grammar.corrections == targets
    assert metrics["over_correction_rate"] == 0.0
    assert metrics["correction_exact_match"] == 1.0
    assert metrics["preamble_rate"] == metrics["explanation_rate"] == 1.0
    assert metrics["mean_edits_to_input"] == 1.0 and metrics["mean_edits_to_target"] == 0.0
    # verbosity is its own figure: 12 words of chatter around each correction, 4.6x too long
    assert metrics["mean_words"] == pytest.approx(46 / 3)
    assert metrics["words_vs_target"] == pytest.approx(46 / 10)


def test_over_correction_is_a_wrong_correction_that_changed_more_than_the_reference():
    inputs = ["She go home.", "She go home.", "She go home.", "She go home.", "The dog bark."]
    targets = ["She goes home."] * 4 + ["The dog barks."]
    outputs = [
        "She goes home.",  # right
        "She go home.",  # wrong, 0 edits: under-correction, not over
        "Here is the corrected sentence: She is going to her home.",  # wrong, 4 edits > 1
        "She went home. Explanation: past tense.",  # wrong, 1 edit: as many as the reference
        "Sure: The dogs are barking loudly.",  # wrong, 3 edits > 1
    ]
    rows, metrics = _rows(outputs, inputs, targets)
    checks = rows.grammar
    assert checks.correct.tolist() == [True, False, False, False, False]
    assert checks.edits_to_input.tolist() == [1, 0, 4, 1, 4]
    assert checks.edits_to_target.tolist() == [0, 1, 4, 1, 4]
    assert checks.over_correction.tolist() == [False, False, True, False, True]
    assert checks.preamble.tolist() == [False, False, True, False, True]
    assert checks.explanation.tolist() == [False, False, False, True, False]
    assert metrics["over_correction_rate"] == pytest.approx(0.4)
    assert metrics["correction_exact_match"] == pytest.approx(0.2)
    words = np.array([3, 3, 11, 6, 6])
    assert metrics["words_vs_target"] == pytest.approx(words.sum() / 15)


def test_the_matrix_table_shows_each_model_in_words():
    from tunelens.evaluators.pages.models_table import ModelColumn, models_side_by_side
    from tunelens.evaluators.scoring.recommendation import Recommendation

    recommendation = Recommendation("v1", "v2", ["recommended v1: the best exact_match (80%)",
                                                 "backup v2: the only other eligible candidate",
                                                 "v3: verdict REJECT, not eligible"])
    metrics = {"base/mean_words": 10.0, "base/words_vs_target": 2.5,
               "base/preamble_rate": 1.0, "base/explanation_rate": 0.5,
               "base/over_correction_rate": 0.25,
               "v1/mean_words": 4.0, "v1/words_vs_target": 1.0, "v1/preamble_rate": 0.0,
               "v1/explanation_rate": 0.0, "v1/over_correction_rate": 0.0,
               "v1/served_latency_ms_p50": 41.6, "v1/served_latency_ms_p95": 58.2,
               "v1/memory_total_gib": 1.234}
    columns = [ModelColumn("base", "base", "the reference"),
               *(ModelColumn(label, "base", recommendation.suited_for(label))
                 for label in ("v1", "v2", "v3", "v4"))]
    table = models_side_by_side(columns, metrics)
    assert table.labels == ["base", "v1", "v2", "v3", "v4"]
    rows = dict(table.rows)
    assert list(rows) == ["adds a preamble", "explains", "over-corrects",
                          "output length (vs expected)", "speed", "memory", "suited for"]
    assert rows["adds a preamble"][:3] == ["100% of answers", "0% of answers", "not measured"]
    assert rows["over-corrects"][0] == "25% of answers"
    assert rows["output length (vs expected)"][:2] == [
        "2.5x the expected answer", "1.0x the expected answer (0.4x its base)"]
    assert rows["speed"][:2] == ["not measured", "p50 42 ms, p95 58 ms per request as served"]
    assert rows["memory"][1] == "1.23 GiB as served"
    assert rows["suited for"][1:4] == ["recommended v1: the best exact_match (80%)",
                                       "backup v2: the only other eligible candidate",
                                       "v3: verdict REJECT, not eligible"]
    assert rows["suited for"][4].startswith("not chosen")
    # without the grammar profile's checks, their rows are left out
    plain = models_side_by_side(columns[:2], {"v1/words_vs_target": 3.0})
    assert [name for name, _ in plain.rows][0] == "output length (vs expected)"
