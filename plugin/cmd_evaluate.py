"""`tunelens evaluate models:/NAME/VERSION --data FILE`: base, fine-tuned and the alias holder side
by side, verdict on the version; `--json` and `--fail-on` make it a CI gate. With several versions
(bases may differ): one comparison matrix, each version's verdict, and which one to deploy."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from tunelens.errors import TunelensError
from tunelens.plugin.cli import add_tracking_uri_argument, tracking_uri
from tunelens.settings import Settings

HELP = ("run a registered LoRA version (or full fine-tune), its base and the version holding the "
        "promotion alias (and other versions) side by side on a test set, log everything to one "
        "MLflow run and tag the version with a verdict; given several versions, compare them all "
        "and recommend one; with text groups and no test set, their perplexity by domain")
DECISIONS = ("promote", "reject", "inconclusive")


def fail_on(value: str) -> frozenset[str]:
    """--fail-on reject,inconclusive -> {"REJECT", "INCONCLUSIVE"}."""
    chosen = {part.strip().lower() for part in value.split(",") if part.strip()}
    unknown = chosen - set(DECISIONS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown decision(s) {', '.join(sorted(unknown))}: use "
                                         f"a comma-separated list of {', '.join(DECISIONS)}")
    return frozenset(c.upper() for c in chosen)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_uris", nargs="*", metavar="models:/NAME/VERSION",
                        help="the version to evaluate (models:/NAME@ALIAS works too); several "
                        "versions, of one base or several, are compared in one matrix and one of "
                        "them is recommended for deployment")
    parser.add_argument("--candidate", metavar="DIR", help="evaluate a folder on disk instead "
                        "of a registered version: a LoRA adapter or a full fine-tune (a whole "
                        "model folder), against --base, on --data; no holder is compared and "
                        "no version gets a verdict")
    parser.add_argument("--data", metavar="FILE_OR_URI",
                        help="test set: JSONL, CSV or parquet with inputs/targets columns, a "
                        "local file or an MLflow artifact URI (runs:/, models:/, "
                        "mlflow-artifacts:/, s3://, ...); without it, --texts alone: every "
                        "version and its base scored for perplexity per text group (domain), "
                        "nothing generated")
    parser.add_argument("--base", metavar="DIR", help="local base model folder (default: found "
                        "from the version's tags, MLmodel or adapter config)")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers", "openai_server"],
                        help="generation backend (default: evaluation.backend in conf.yaml)")
    parser.add_argument("--endpoint", metavar="URL", help="evaluate on a running OpenAI-compatible "
                        "server (vllm serve BASE --enable-lora): the base is its served model, the "
                        "adapters are loaded on it as LoRA modules and unloaded afterwards "
                        "(default: evaluation.endpoint.url)")
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the "
                        "endpoint's API key")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="tokens generated per row at most (default: conf.yaml)")
    parser.add_argument("--against", nargs="+", default=[], metavar="ALIAS_OR_VERSION",
                        help="also run these versions or aliases (e.g. staging, 3); the holder of "
                        "promotion.alias always runs")
    parser.add_argument("--primary-metric", metavar="NAME", help="the quality metric the verdict "
                        "judges: exact_match, token_f1, chrf, rouge_l (default: "
                        "verdict.primary_metric)")
    parser.add_argument("--texts", action="append", default=[], metavar="[NAME=]PATH",
                        help="a text group scored for perplexity by every model (repeatable): a "
                        ".txt file (texts separated by blank lines), a .jsonl file (a \"text\" "
                        "field per line) or a folder of .txt files; NAME defaults to the stem")
    parser.add_argument("--guard", action="append", default=[], metavar="NAME",
                        help="a text group that must not get worse (repeatable): its perplexity "
                        "joins the verdict (non-inferiority within evaluation.texts.margin)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout "
                        "(verdict, its parts, rules with observed values, metrics per model); "
                        "everything else goes to stderr")
    parser.add_argument("--fail-on", type=fail_on, default=frozenset(), metavar="DECISIONS",
                        help="exit 1 when the verdict is one of these (comma-separated: "
                        "reject,inconclusive); with several versions, exit 1 when none is "
                        "recommended; errors exit 2")
    parser.add_argument("--verbose", action="store_true", help="show engine and library logs on "
                        "the console (default: a log file under ~/.cache/tunelens/logs, named on "
                        "stderr at the end)")
    add_tracking_uri_argument(parser)


def log_file() -> Path:
    """Where this run's engine and library logs go: the user's cache, one file per run (the
    system's temporary folder when the cache cannot be written)."""
    import tempfile
    import time

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelens" / "logs"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir())
    return root / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextlib.contextmanager
def stdout_to_stderr():
    """Route file descriptor 1 to 2 (engine workers and libraries print there too), so that
    stdout carries nothing but the JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _finite(value):
    """JSON has no NaN: unmeasured figures become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _measured(values: dict[str, float], name: str, fmt: str, unit: str) -> str:
    value = values.get(name)
    return "not measured" if value is None else f"{value:{fmt}} {unit}"


def _print_text(outcome) -> None:
    primary = outcome.primary_metric
    name = (f"{outcome.model_name} v{outcome.version}" if outcome.model_uri.startswith("models:/")
            else outcome.model_uri)
    print(f"{name}: {outcome.verdict.decision.value}  "
          f"({outcome.rows_evaluated} rows, {outcome.rows_skipped_too_long} skipped as too long; "
          f"backend {outcome.backend.name}: {outcome.backend.reason})")
    for label, values in outcome.per_model().items():
        print(f"  {label:>12}: {primary} {values.get(primary, math.nan):.3f}, "
              f"{values.get('mean_words', math.nan):.1f} words, served p95 "
              f"{_measured(values, 'served_latency_ms_p95', '.0f', 'ms')}, memory as served "
              f"{_measured(values, 'memory_total_gib', '.3f', 'GiB')}, identical to base "
              f"{values.get('identical_to_base', math.nan):.0%}")
    for label, values in outcome.per_model().items():
        groups = {k.removeprefix("ppl_"): v for k, v in values.items() if k.startswith("ppl_")}
        if groups:
            print(f"  {label:>12}: perplexity " + ", ".join(f"{g} {v:.4g}"
                                                           for g, v in groups.items()))
    for part in outcome.verdict.parts:
        print(f"  vs {part.reference} ({part.against}): {part.decision.value}")
        for rule in part.rules:
            print(f"    [{rule.status}] {rule.name}: {rule.detail}")
    for note in outcome.notes[3:]:  # the first three repeat the header
        print(f"  note: {note}")
    for warning in outcome.verdict.warnings:
        print(f"  warning: {warning}")
    print(f"run {outcome.run_id}")


def _print_matrix(outcome) -> None:
    plan, scores = outcome.plan, outcome.scores
    primary = plan.first.primary.name
    recommendation = outcome.recommendation
    print(f"{len(plan.candidates)} candidates, {len(plan.kept)} rows ({plan.skipped} skipped as "
          f"too long; backend {plan.backend.name}): recommended "
          f"{recommendation.recommended or 'none'}, backup {recommendation.backup or 'none'}")
    width = max(len(label) for label in plan.labels)
    for model in plan.models:
        values = {k.split("/", 1)[1]: v for k, v in scores.metrics.items()
                  if k.startswith(f"{model.label}/")}
        verdict = (outcome.verdict_of(model.label).decision.value
                   if model.role == "candidate" else f"({model.role})")
        print(f"  {model.label:>{width}}: {verdict:<12} {primary} "
              f"{values.get(primary, math.nan):.3f}, {values.get('mean_words', math.nan):.1f} "
              f"words, served p50 {_measured(values, 'served_latency_ms_p50', '.0f', 'ms')}, "
              f"memory as served {_measured(values, 'memory_total_gib', '.3f', 'GiB')}")
    for candidate in plan.candidates:
        for part in outcome.verdict_of(candidate.label).parts:
            for rule in part.deciding():
                print(f"    {candidate.label} vs {part.reference}: "
                      f"[{rule.status}] {rule.name}: {rule.detail}")
    for reason in recommendation.reasons:
        print(f"  {reason}")
    print(f"run {outcome.run_id}")


def _compare(args: argparse.Namespace, config: Settings) -> int:
    """Several versions: one matrix, a verdict each, a recommendation."""
    from tunelens.evaluators.matrix import compare_versions

    if args.against:
        raise TunelensError("--against applies to one version at a time; with several versions "
                            "list every version to compare instead")
    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        outcome = compare_versions(args.model_uris, args.data, base=args.base,
                                   backend=args.backend, max_new_tokens=args.max_new_tokens,
                                   config=config, primary_metric=args.primary_metric,
                                   texts=args.texts, guard=args.guard)
    if args.json:
        print(json.dumps(_finite(outcome.to_dict()), indent=None, default=str))
    else:
        _print_matrix(outcome)
    return 1 if args.fail_on and outcome.recommendation.recommended is None else 0


# Options that judge or shape generated answers: refused without --data (nothing is generated).
_GENERATION_OPTIONS = (("guard", "--guard"), ("against", "--against"), ("fail_on", "--fail-on"),
                       ("primary_metric", "--primary-metric"),
                       ("max_new_tokens", "--max-new-tokens"))


def _print_domains(outcome) -> None:
    table = outcome.table
    labels = table.labels
    width = max(len(d) for d in table.domains)
    print(f"perplexity by domain, normalised 0 (best) to 1 (worst) per domain; raw perplexity "
          f"in brackets (backend {outcome.plan.backend.name}, nothing generated)")
    print(f"  {'':>{width}}  " + "  ".join(f"{label:>18}" for label in labels) + "  best")
    for domain in table.domains:
        cells = [f"{table.normalised[domain][label]:.2f} ({table.ppl[domain][label]:.4g})"
                 for label in labels]
        print(f"  {domain:>{width}}  " + "  ".join(f"{c:>18}" for c in cells)
              + f"  {table.best(domain)}")
    for note in table.notes[2:]:  # the first two repeat the header
        print(f"  note: {note}")
    print(f"run {outcome.run_id}")


def _domains(args: argparse.Namespace, config: Settings) -> int:
    """No test set: the versions and their bases scored on the text groups alone."""
    from tunelens.evaluators.domains import compare_domains

    given = [flag for name, flag in _GENERATION_OPTIONS if getattr(args, name)]
    if given:
        raise TunelensError(f"{', '.join(given)} judge{'s' if len(given) == 1 else ''} generated "
                            "answers: give a test set with --data, or leave "
                            f"{'it' if len(given) == 1 else 'them'} out to compare perplexity "
                            "by domain")
    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        outcome = compare_domains(args.model_uris, args.texts, config=config, base=args.base,
                                  backend=args.backend)
    if args.json:
        print(json.dumps(_finite(outcome.to_dict()), indent=None, default=str))
    else:
        _print_domains(outcome)
    return 0


def _check_models(args: argparse.Namespace) -> None:
    """Registered versions or one --candidate folder, not both, not neither."""
    if args.candidate and args.model_uris:
        raise TunelensError("give registered versions (models:/NAME/VERSION) or one --candidate "
                            "DIR, not both")
    if not args.candidate and not args.model_uris:
        raise TunelensError("nothing to evaluate: give models:/NAME/VERSION or --candidate DIR")
    if args.candidate and args.data is None:
        raise TunelensError("--candidate DIR is evaluated on a test set: add --data FILE")


def run(args: argparse.Namespace) -> int:
    from tunelens.artifact_uris import fetch_dataset
    from tunelens.config import load_config, with_endpoint
    from tunelens.console import quiet_console

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise TunelensError("--max-new-tokens must be at least 1")
    _check_models(args)
    tracking_uri(args)  # MLflow's default server for this process
    log_path = log_file()
    with quiet_console(log_path, args.verbose), \
            tempfile.TemporaryDirectory(prefix="tunelens-data-") as fetched:
        config = with_endpoint(load_config(args.config), args.endpoint, args.api_key_env)
        if args.data is None:
            code = _domains(args, config)
        else:
            args.data = fetch_dataset(args.data, Path(fetched))
            code = (_compare if len(args.model_uris) > 1 else _evaluate)(args, config)
    if not args.verbose:
        print(f"engine and library logs: {log_path} (--verbose shows them here)", file=sys.stderr)
    return code


def _evaluate(args: argparse.Namespace, config: Settings) -> int:
    """One version against its base and the alias holder."""
    from tunelens.evaluators.run import NotMeasured, evaluate_version

    try:
        with stdout_to_stderr() if args.json else contextlib.nullcontext():
            outcome = evaluate_version(args.model_uris[0] if args.model_uris else "", args.data,
                                       candidate=args.candidate, base=args.base,
                                       against=args.against, backend=args.backend,
                                       max_new_tokens=args.max_new_tokens, config=config,
                                       primary_metric=args.primary_metric, texts=args.texts,
                                       guard=args.guard)
    except NotMeasured as stopped:  # its verdict is logged: scripts read it, the error line follows
        if args.json:
            print(json.dumps(stopped.to_dict(), indent=None, default=str))
        raise
    if args.json:
        print(json.dumps(_finite(outcome.to_dict()), indent=None, default=str))
    else:
        _print_text(outcome)
    return 1 if outcome.verdict.decision.value in args.fail_on else 0
