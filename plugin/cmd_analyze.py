"""`tunelens analyze ADAPTER [--base DIR] [--out DIR]`: the weight analysis, written to a folder."""
from __future__ import annotations

import argparse
import sys

HELP = "analyse a LoRA adapter's weight changes: analysis.json, report.html and PNG charts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER",
                        help="PEFT LoRA adapter directory, or an MLflow model directory with peft/")
    parser.add_argument("--base", metavar="DIR",
                        help="local base model directory (config.json + safetensors): adds relative "
                             "change, amplification, intruder dimensions, DoRA and modules_to_save ΔW")
    parser.add_argument("--out", metavar="DIR", default="tunelens-analysis",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from tunelens.config import load_config
    from tunelens.registry_hooks.analysis import analyze_adapter
    from tunelens.registry_hooks.outputs import write_analysis

    result = analyze_adapter(args.adapter, args.base, config=load_config(args.config),
                             progress=not args.no_progress)
    files = write_analysis(result, args.out)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{len(result.modules)} modules analysed; wrote {files.json_path}, {files.html_path} and "
          f"{len(files.chart_paths)} charts")
    return 0
