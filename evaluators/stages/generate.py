"""The generation stage: every model's outputs on the planned rows, one engine at a time.

`run_group` runs one base's engine (closed before the next): the batch outputs of its models, the
text groups' token log-probabilities and activation drift, and, when asked, latency and memory as
served (timing.schedule, around and on that engine). `generate` runs a single evaluation's groups;
the comparison matrix runs its own union of groups with the same `run_group`.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from tunelens.errors import TunelensError
from tunelens.evaluators.engines.choice import BackendChoice
from tunelens.evaluators.engines.interface import Candidate, Engine, Phase
from tunelens.settings import GenerationSettings, Settings
from tunelens.evaluators.stages.plan import BASE, FINETUNED, EngineGroup, EvaluationPlan
from tunelens.evaluators.texts.drift import (DriftProfile, full_weight_delta_by_layer,
                                             measure_drift, model_drift)
from tunelens.evaluators.texts.perplexity import TextPlan, score_texts
from tunelens.evaluators.timing.profiles import ServingFigures, ServingSettings
from tunelens.evaluators.timing.rules import LatencyJudgement
from tunelens.evaluators.timing.schedule import ServedTiming


@dataclass(frozen=True)
class Generated:
    phases: dict[str, Phase]  # by label, in plan.labels order
    engine_settings: dict  # how the (first) engine ran: parallelism, dtype
    # latency and memory as served for the models on the candidate's base (None: sample_rows 0)
    serving: ServingFigures | None = None
    text_logprobs: dict | None = None  # by label: per text, each token's log-probability
    drift: DriftProfile | None = None


@dataclass(frozen=True)
class GroupRun:
    """What one engine group produced: every member's batch phase, and (when asked) its members'
    latency and memory as served, the text groups' log-probabilities and the drift."""

    phases: dict[str, Phase]  # by candidate label, in the group's order
    engine_settings: dict
    serving: ServingFigures | None = None
    text_logprobs: dict | None = None
    drift: dict[str, DriftProfile] = field(default_factory=dict)  # by candidate label


def run_phases(engine: Engine, candidates: list[Candidate], prompt_ids: list[list[int]], tokenizer,
               settings: GenerationSettings) -> list[Phase]:
    """Each model in its own timed phase, base first, on identical token ids and settings."""
    return [engine.generate(c, prompt_ids, tokenizer, settings) for c in candidates]


def run_group(group: EngineGroup, rows: list[int], backend: BackendChoice,
              settings: GenerationSettings, config: Settings, *, serve: bool,
              texts: TextPlan | None = None,
              drift_pairs: tuple[tuple[Candidate, Candidate], ...] = (),
              judged: tuple[str, ...] = (FINETUNED,)) -> GroupRun:
    """One base's engine: its members' outputs on `rows`, then (with `texts`) their text
    log-probabilities and the drift of each of `drift_pairs` (base, candidate): on the engine
    when it is a transformers one, else on one transformers model after it closed; with `serve` (and
    evaluation.latency.sample_rows > 0), latency and memory as served (serving.ServedTiming).

    Engines, one in memory at a time. vLLM with adapters served as such: a plain engine times the
    base; the LoRA-enabled generation engine runs the batch phases, the text log-probabilities,
    then times the adapters; a plain engine times the base again. vLLM with merged candidates:
    the generation engine, then a plain engine each for the base, every merged candidate, the base
    again. transformers: the generation model, then one process timing every model as served.
    Either way, more rounds of rows while a judged candidate's latency rule is undecided
    (evaluation.latency.max_rounds; vLLM: on fresh engines). Without `serve`, the generation
    engine alone."""
    from transformers import AutoTokenizer

    evaluation = config.evaluation
    adapters = [c.adapter_dir for c in group.candidates if c.adapter_dir is not None]
    tokenizer = AutoTokenizer.from_pretrained(group.base_dir)
    prompt_ids = [group.prompt_ids[i] for i in rows]
    text_logprobs = serving = None
    drift: dict[str, DriftProfile] = {}
    with tempfile.TemporaryDirectory(prefix="tunelens-serving-") as work_dir:
        timing = (ServedTiming(group.base_dir, group.candidates, prompt_ids, tokenizer, settings,
                               evaluation, backend.name, max_model_len=group.max_model_len,
                               work_dir=work_dir,
                               judgement=_latency_judgement(group, config, judged))
                  if serve and ServingSettings.from_config(evaluation).sample_rows > 0 else None)
        if timing is not None:
            timing.before_generation()
        shared = timing is not None and timing.uses_generation_engine
        engine = backend.backend.start(group.base_dir, adapters, evaluation, settings,
                                       group.max_model_len, inspect_workers=shared)
        try:
            done = run_phases(engine, group.candidates, prompt_ids, tokenizer, settings)
            if texts is not None:  # on the same engine, after generating
                text_logprobs = score_texts(engine, group.candidates, texts, group.base_dir)
                if drift_pairs and engine.name == "transformers":
                    drift = group_drift(engine, texts, group, drift_pairs, config)
            if timing is not None:
                timing.on_generation_engine(engine)
            engine_settings = engine.settings
        finally:
            engine.close()
        if drift_pairs and texts is not None and not drift:  # after the vLLM engine closed
            drift = group_drift(None, texts, group, drift_pairs, config)
        if timing is not None:
            serving = _served_or_why(timing)
    return GroupRun({c.label: phase for c, phase in zip(group.candidates, done)},
                    engine_settings, serving, text_logprobs, drift)


def _served_or_why(timing: ServedTiming) -> ServingFigures:
    """The timing's figures; when a server refuses or times out during it (the outputs are in by
    then), no figures and the one line why, so the served rules are undecided (an INCONCLUSIVE
    part) rather than the evaluation stopping."""
    try:
        return timing.after_generation()
    except TunelensError as exc:
        return ServingFigures((), (), (f"latency and memory as served not measured: {exc}",),
                              unmeasured=str(exc))


def _latency_judgement(group: EngineGroup, config: Settings,
                       judged: tuple[str, ...]) -> LatencyJudgement | None:
    """The verdict's latency rule for the `judged` candidates in `group`, None when none is
    judged (no limit set, or none of them runs on this engine)."""
    settings = config.verdict
    here = tuple(c.label for c in group.candidates if c.label in judged)
    if settings.max_latency_ratio is None or not here:
        return None
    return LatencyJudgement(here, float(settings.max_latency_ratio),
                            level=float(settings.confidence_level),
                            n_resamples=int(settings.bootstrap_resamples),
                            seed=int(settings.seed),
                            max_core_wait=config.evaluation.latency.max_core_wait,
                            concurrency=int(settings.latency_at))


def generate(plan: EvaluationPlan) -> Generated:
    """Every model's outputs on the kept rows, one engine at a time (closed before the next), and
    latency and memory as served for the models on the candidate's base (run_group: around and on
    that base's engine)."""
    phases: dict[str, Phase] = {}
    first: GroupRun | None = None
    text_logprobs = {} if plan.texts is not None else None
    wants_drift = plan.texts is not None and plan.texts.drift_texts > 0
    for index, group in enumerate(plan.groups):
        by_label = {c.label: c for c in group.candidates}
        drift_pairs = (((by_label[BASE], by_label[FINETUNED]),)
                       if index == 0 and wants_drift and FINETUNED in by_label else ())
        done = run_group(group, plan.kept, plan.backend, plan.settings, plan.config,
                         serve=index == 0, texts=plan.texts, drift_pairs=drift_pairs)
        first = first or done
        phases |= done.phases
        if text_logprobs is not None:
            text_logprobs |= done.text_logprobs
    drift = first.drift.get(FINETUNED)
    if wants_drift and drift is None:  # a full fine-tune: its own model, after every engine
        drift = full_model_drift(plan)
    return Generated({label: phases[label] for label in plan.labels}, first.engine_settings,
                     first.serving, text_logprobs, drift)


def full_model_drift(plan: EvaluationPlan) -> DriftProfile:
    """The full fine-tune's activation drift from its base on the first texts (transformers, one
    model at a time), beside the full diff's per-layer change."""
    model_dir = plan.base_of(FINETUNED)
    ids = plan.texts.token_ids[str(plan.base_dir)][:plan.texts.drift_texts]
    return model_drift(plan.base_dir, model_dir, Candidate(BASE), Candidate(FINETUNED), ids,
                       full_weight_delta_by_layer(model_dir, plan.base_dir, plan.config),
                       plan.config)


def group_drift(engine, texts: TextPlan, group: EngineGroup,
                pairs: tuple[tuple[Candidate, Candidate], ...], config: Settings
                ) -> dict[str, DriftProfile]:
    """Each pair's candidate's activation drift from its base on the first texts
    (transformers), by candidate label."""
    ids = texts.token_ids[str(group.base_dir)][:texts.drift_texts]
    return measure_drift(engine, group.base_dir, pairs, ids, config)

