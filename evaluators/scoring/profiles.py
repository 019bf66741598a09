"""Task profiles: per-row checks and verdict rules that fit one kind of task, chosen in conf.yaml.

With no profile (the default) a version is judged on its quality metrics, length, latency and
memory only, which fits any generative task. `evaluation.task_profile: grammar` adds the checks of
sentence correction: a chatty preamble or an explanation (evaluation.behaviour's patterns), word
edit distances to the input and the reference, over-correction, and answers no longer than the
base's (a conciseness limit of 1.0 x the base's mean words, unless verdict.max_mean_words_ratio
sets one).
"""
from __future__ import annotations

from dataclasses import dataclass

from tunelens.errors import TunelensError
from tunelens.settings import Settings


@dataclass(frozen=True)
class TaskProfile:
    name: str
    behaviour_checks: bool  # preamble / explanation patterns, edit distances, over-correction
    max_mean_words_ratio: float | None  # conciseness limit when verdict.max_mean_words_ratio is null


PROFILES = {"grammar": TaskProfile("grammar", behaviour_checks=True, max_mean_words_ratio=1.0)}


def task_profile(config: Settings) -> TaskProfile | None:
    """The profile conf.yaml's evaluation.task_profile names, None for none."""
    name = config.evaluation.task_profile
    if name is None:
        return None
    if name not in PROFILES:
        raise TunelensError(f"evaluation.task_profile {name!r} is unknown: use null or one of "
                            f"{', '.join(PROFILES)}")
    return PROFILES[name]
