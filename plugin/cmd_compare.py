"""`tunelens compare A B [C ...] [--base DIR] [--out DIR]`: adapters of one base, side by side."""
from __future__ import annotations

import argparse
import sys

HELP = ("compare LoRA adapters (or analysis.json results) of one base: per-layer profiles, "
        "attention vs MLP share, module-by-module subspace overlap and shared top shifted neurons, "
        "one report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", metavar="INPUT", nargs="+",
                        help="adapter directories, analysis.json files or folders holding one")
    parser.add_argument("--base", metavar="DIR", help="local base model directory for the adapters")
    parser.add_argument("--out", metavar="DIR", default="tunelens-compare",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from tunelens.config import load_config
    from tunelens.registry_hooks.engine.compare import compare
    from tunelens.registry_hooks.report.compare_page import write_comparison

    comparison = compare(args.inputs, args.base, config=load_config(args.config),
                         progress=not args.no_progress)
    json_path, html_path, charts = write_comparison(comparison, args.out)
    for warning in comparison.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"compared {len(comparison.labels)} inputs; wrote {json_path}, {html_path} and "
          f"{len(charts)} charts")
    return 0
