"""`tunelens evaluate models:/NAME/VERSION --data FILE`: base vs fine-tuned, verdict on the version."""
from __future__ import annotations

import argparse

from tunelens.plugin.cli import add_tracking_uri_argument, tracking_uri

HELP = ("run a registered LoRA version and its base (and other versions) side by side on a test "
        "set, log everything to one MLflow run and tag the version with a verdict")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_uri", metavar="models:/NAME/VERSION",
                        help="the version to evaluate (models:/NAME@ALIAS works too)")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="test set: JSONL, CSV or parquet with inputs/targets columns")
    parser.add_argument("--base", metavar="DIR", help="local base model folder (default: found "
                        "from the version's tags, MLmodel or adapter config)")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"],
                        help="generation backend (default: evaluation.backend in conf.yaml)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="tokens generated per row at most (default: conf.yaml)")
    parser.add_argument("--against", nargs="+", default=[], metavar="ALIAS_OR_VERSION",
                        help="also run these versions or aliases (e.g. production, 3)")
    add_tracking_uri_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tunelens.config import load_config
    from tunelens.evaluators.run import evaluate_version

    tracking_uri(args)  # MLflow's default server for this process

    outcome = evaluate_version(args.model_uri, args.data, base=args.base, against=args.against,
                               backend=args.backend, max_new_tokens=args.max_new_tokens,
                               config=load_config(args.config))
    metrics = outcome.metrics
    print(f"{outcome.model_name} v{outcome.version}: {outcome.verdict.decision.value}  "
          f"({outcome.rows_evaluated} rows, {outcome.rows_skipped_too_long} skipped as too long; "
          f"backend {outcome.backend.name}: {outcome.backend.reason})")
    for label in outcome.labels:
        print(f"  {label:>12}: exact match {metrics[f'{label}/exact_match']:.1%}, "
              f"{metrics[f'{label}/mean_words']:.1f} words, p95 "
              f"{metrics.get(f'{label}/latency_ms_p95', float('nan')):.0f} ms, identical to base "
              f"{metrics[f'{label}/identical_to_base']:.0%}")
    for rule in outcome.verdict.rules:
        print(f"  [{rule.status}] {rule.name}: {rule.detail}")
    for note in outcome.notes[3:]:  # the first three repeat the header
        print(f"  note: {note}")
    for warning in outcome.verdict.warnings:
        print(f"  warning: {warning}")
    print(f"run {outcome.run_id}")
    return 0
