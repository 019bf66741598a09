"""The plan stage: every input of an evaluation checked, and what runs where, before anything
is written.

`plan_evaluation` reads an `EvaluationRequest` (what to evaluate and how) and the settings, and
gives an `EvaluationPlan`: the test set and the rows every model can take, the candidate's files
and base, the holder of the promotion alias and the other versions compared, one `EngineGroup`
per base (the base never twice in memory, two bases never at once), the backend, the quality
metrics and the text groups. Every bad input raises TunelensError here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tunelens.errors import TunelensError
from tunelens.evaluators.engines.choice import BackendChoice, check_text_scoring, choose_backend
from tunelens.evaluators.adapter_fit import check_adapter_fits
from tunelens.evaluators.engines.interface import Candidate
from tunelens.evaluators.inputs.prompts import build_prompts, generation_settings
from tunelens.settings import EvaluationSettings, GenerationSettings, Settings
from tunelens.evaluators.scoring.profiles import TaskProfile, task_profile
from tunelens.evaluators.scoring.quality import QualityMetric, quality_metrics
from tunelens.evaluators.texts.perplexity import TextPlan, plan_texts
from tunelens.evaluators.timing.profiles import ServingSettings
from tunelens.registry.datasets import EvalDataset, load_dataset
from tunelens.registry.files import ModelRef, download_version, local_model
from tunelens.registry.verdicts import HolderCoverage
from tunelens.registry.version import parse_model_uri, resolve_version

log = logging.getLogger(__name__)

# The labels of a single evaluation: the candidate's base and the candidate; the holder is
# labelled by its alias, each other version compared by vN or its alias.
BASE, FINETUNED = "base", "finetuned"


@dataclass(frozen=True)
class EvaluationRequest:
    """What to evaluate and how: the inputs `plan_evaluation` checks.

    `data`: the test set (a CSV/JSON/Parquet path or a DataFrame); `base`: the base model folder
    (else the registry's resolution order); `against`: other versions or aliases compared beside
    the holder of promotion.alias; `backend`, `max_new_tokens`, `primary_metric`: override
    conf.yaml's; `extra_metrics`: mlflow.metrics.make_metric metrics scored per row like the
    built-ins; `texts`: text groups ("NAME=PATH" or "PATH") scored for perplexity, `guard`: the
    names of those that must not get worse; `fetched`: the candidate's files when the caller
    already has them (the hook worker's, so a version evaluated on registration is fetched once);
    `candidate`: an adapter or full model folder on disk evaluated in place of a registered
    version (with `base`; no holder, no verdict on a version).
    """

    model_uri: str
    data: object
    base: str | Path | None = None
    against: tuple[str, ...] = ()
    backend: str | None = None
    max_new_tokens: int | None = None
    extra_metrics: tuple = ()
    primary_metric: str | None = None
    texts: tuple[str, ...] = ()
    guard: tuple[str, ...] = ()
    fetched: ModelRef | None = None
    candidate: Path | None = None  # a candidate folder on disk instead of model_uri


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
    config: Settings
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


def resolve_base(client, ref: ModelRef, base: str | Path | None, config: Settings) -> Path:
    """The base folder: --base if given, else the registry hooks' resolution order."""
    if base is not None:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise TunelensError(f"base model {path} is not a model folder (no config.json)")
        return path
    from tunelens.registry.base_model import resolve_base_model

    found = resolve_base_model(client, ref.name, ref.version, config, model_dir=ref.model_dir)
    if found.path is None:
        raise TunelensError(f"cannot find the base model of {ref.name} v{ref.version} (tried: "
                            f"{'; '.join(found.tried) or 'nothing'}); pass --base DIR")
    return Path(found.path)


def context_length(base_dir: Path, configured: int | None) -> int:
    """The engine's context: evaluation.vllm.max_model_len when set, else the model's own."""
    from transformers import AutoConfig

    if configured:
        return int(configured)
    model_config = AutoConfig.from_pretrained(base_dir)
    return int(getattr(model_config, "max_position_embeddings", 2048))


def _holder(client, name: str, alias: str) -> str | None:
    """The version a candidate must hold its own against: `name@alias`'s holder (or, while the
    alias is deleted, its last holder), None if there is none."""
    from tunelens.registry.promotion import holder_to_beat

    return holder_to_beat(client, client.get_registered_model(name), alias)


def _holder_base(client, ref: ModelRef, config: Settings, fallback: Path) -> Path:
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


@dataclass(frozen=True)
class _Quality:
    """The test set, generation settings and quality metrics, checked."""

    dataset: EvalDataset
    settings: GenerationSettings
    metrics: list[QualityMetric]
    primary: QualityMetric
    profile: TaskProfile | None


def _check_quality(request: EvaluationRequest, config: Settings) -> _Quality:
    """The test set, generation settings, quality metrics and task profile; the latency settings
    too, so a bad one fails here, not after generating."""
    evaluation = config.evaluation
    dataset = load_dataset(request.data, inputs_column=evaluation.inputs_column,
                           targets_column=evaluation.targets_column)
    settings = generation_settings(evaluation.generation, request.max_new_tokens)
    primary_name = request.primary_metric or config.verdict.primary_metric
    metrics = quality_metrics(list(evaluation.metrics), evaluation.exact_match,
                              request.extra_metrics, primary_name)
    primary = next(m for m in metrics if m.name == primary_name)
    profile = task_profile(config)
    ServingSettings.from_config(evaluation)
    return _Quality(dataset, settings, metrics, primary, profile)


@dataclass(frozen=True)
class _Versions:
    """The candidate's files and base, the alias's holder, and every other version compared."""

    ref: ModelRef
    base_dir: Path
    holder: HolderCoverage | None  # None for a local candidate: no registered model to look at
    holder_label: str | None
    compared: list[tuple[str, ModelRef]]  # (label, files): the holder first, then --against
    notes: list[str]


def _local_candidate(client, request: EvaluationRequest, config: Settings) -> _Versions:
    """A candidate folder on disk: its base is --base; no registered model, so no holder and no
    other version."""
    if request.base is None:
        raise TunelensError("--candidate DIR needs --base DIR: a folder on disk has no registry "
                            "entry to find its base from")
    if request.against:
        raise TunelensError("--against compares registered versions of one model: not with "
                            "--candidate")
    ref = local_model(Path(request.candidate))
    note = (f"the candidate is a local folder: no registered model, so no holder of "
            f"{config.promotion.alias} is compared and no verdict is written on a version")
    return _Versions(ref, resolve_base(client, ref, request.base, config), None, None, [],
                     [note])


def _fetch_versions(client, request: EvaluationRequest, config: Settings) -> _Versions:
    """The candidate (fetched unless the caller has its files), its base, the holder of
    promotion.alias (compared unless it is the candidate) and each --against version."""
    if request.candidate is not None:
        return _local_candidate(client, request, config)
    name, version, alias = parse_model_uri(request.model_uri)
    version = resolve_version(client, name, version or alias)
    max_bytes = int(config.hooks.max_download_bytes)
    fetched = request.fetched
    ref = (fetched if fetched is not None and (fetched.name, fetched.version) == (name, version)
           else download_version(client, name, version, max_bytes))
    base_dir = resolve_base(client, ref, request.base, config)
    promotion_alias = config.promotion.alias
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
    for reference in request.against:
        other_version = resolve_version(client, name, str(reference))
        label = f"v{other_version}" if str(reference).lstrip("v").isdigit() else str(reference)
        if other_version == version or label in (BASE, FINETUNED):
            raise TunelensError(f"--against {reference} is the version under evaluation itself")
        if other_version == holder_version or label == holder_label:
            notes.append(f"--against {reference}: v{other_version} holds {promotion_alias} and is "
                         "compared as the holder")
            continue
        compared.append((label, download_version(client, name, other_version, max_bytes)))
    return _Versions(ref, base_dir, holder, holder_label, compared, notes)


def check_full_model_fits(base_dir: Path, full_dir: Path) -> None:
    """A full fine-tune has its base's architecture, tensors and shapes (one line when not)."""
    from tunelens.registry_hooks.engine.full_diff import check_same_architecture, open_full_model

    check_same_architecture(open_full_model(full_dir, "fine-tuned"),
                            open_full_model(base_dir, "base"))


def _members_by_base(client, versions: _Versions, config: Settings) -> dict[Path, list[Candidate]]:
    """One group per base: the candidate's base serves base, candidate and every version that
    resolves to it; a version on another base gets an engine of its own, after, and so does a
    full fine-tune (the engine's model is the version itself). Every adapter is checked to fit
    its base, every full fine-tune to have its base's architecture."""
    ref, base_dir = versions.ref, versions.base_dir
    groups_by_base: dict[Path, list[Candidate]] = {base_dir: [Candidate(BASE)]}
    for label, version, own_base in [(FINETUNED, ref, base_dir)] + [
            (label, other, _holder_base(client, other, config, base_dir))
            for label, other in versions.compared]:
        if version.full_dir is not None:
            check_full_model_fits(own_base, version.full_dir)
            groups_by_base[version.full_dir] = [Candidate(label, None, version.version)]
            continue
        key = next((b for b in groups_by_base if b.resolve() == own_base.resolve()), own_base)
        check_adapter_fits(key, version.adapter_dir)
        groups_by_base.setdefault(key, []).append(Candidate(label, version.adapter_dir,
                                                            version.version))
    return groups_by_base


def _rows_that_fit(groups: list[EngineGroup], size: int, evaluation: EvaluationSettings,
                   settings: GenerationSettings) -> tuple[list[int], int]:
    """The rows (up to evaluation.max_rows) whose prompt + max_new_tokens fits every engine's
    context, and how many were left out."""
    limit = size if evaluation.max_rows is None else int(evaluation.max_rows)
    considered = range(min(limit, size))
    kept = [i for i in considered
            if all(len(g.prompt_ids[i]) + settings.max_new_tokens <= g.max_model_len for g in groups)]
    if not kept:
        raise TunelensError(f"every prompt is longer than max_model_len "
                            f"{min(g.max_model_len for g in groups)} minus "
                            f"{settings.max_new_tokens} new tokens: nothing to evaluate")
    return kept, len(considered) - len(kept)


def _labels(groups: list[EngineGroup]) -> list[str]:
    """The base, the candidate, then every other model in engine order."""
    rest = [c.label for g in groups for c in g.candidates if c.label not in (BASE, FINETUNED)]
    return [BASE, FINETUNED, *rest]


def _requested_backend(requested: str | None, evaluation: EvaluationSettings) -> str:
    """The backend asked for; an endpoint's url asks for the server behind it."""
    requested = requested or evaluation.backend
    if not evaluation.endpoint.url:
        return requested
    if requested not in ("auto", "openai_server"):
        raise TunelensError(f"an endpoint is given (evaluation.endpoint.url), so the models run on "
                            f"that server: leave out --backend {requested}")
    return "openai_server"


def plan_evaluation(client, request: EvaluationRequest, config: Settings) -> EvaluationPlan:
    """Check every input and decide what runs where; raises TunelensError, writes nothing."""
    evaluation = config.evaluation
    quality = _check_quality(request, config)
    versions = _fetch_versions(client, request, config)
    groups_by_base = _members_by_base(client, versions, config)
    adapters = [m.adapter_dir for members in groups_by_base.values() for m in members
                if m.adapter_dir is not None]
    choice = choose_backend(_requested_backend(request.backend, evaluation), adapters)
    log.info("tunelens evaluate: %s backend (%s)", choice.name, choice.reason)
    groups = [EngineGroup(group_base, members,
                          context_length(group_base, evaluation.vllm.max_model_len),
                          _tokenize(group_base, quality.dataset, quality.settings))
              for group_base, members in groups_by_base.items()]
    kept, skipped = _rows_that_fit(groups, len(quality.dataset), evaluation, quality.settings)
    text_plan = plan_texts(request.texts, request.guard, config, [g.base_dir for g in groups],
                           min(g.max_model_len for g in groups))
    if text_plan is not None:
        check_text_scoring(choice, adapters)
    notes = list(versions.notes)
    if len(groups) > 1:
        notes.append("; ".join(f"{', '.join(c.label for c in g.candidates)} on {g.base_dir}"
                               for g in groups[1:])
                     + ": another base or a full fine-tune, its own engine, after")
    return EvaluationPlan(
        model_uri=request.model_uri or versions.ref.uri, ref=versions.ref,
        base_dir=versions.base_dir,
        dataset=quality.dataset, kept=kept, skipped=skipped, settings=quality.settings,
        backend=choice, groups=groups, labels=_labels(groups),
        against=tuple(request.against), holder=versions.holder,
        holder_label=versions.holder_label, metrics=quality.metrics, primary=quality.primary,
        profile=quality.profile, config=config, notes=notes, texts=text_plan)
