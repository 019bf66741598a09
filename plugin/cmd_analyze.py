"""`tunelens analyze ADAPTER [--base DIR] [--out DIR]`: the weight analysis, written to a folder."""
from __future__ import annotations

import argparse
import sys

from tunelens.settings import Settings

HELP = "analyse a LoRA adapter's weight changes: analysis.json, report.html (PNGs with --charts)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER", nargs="?",
                        help="PEFT LoRA adapter directory (or an mlx-lm adapter folder), or an "
                             "MLflow model directory with peft/; "
                             "a full fine-tuned model directory with --base diffs the full weights")
    parser.add_argument("--checkpoints", metavar="PATH", nargs="+",
                        help="training evolution instead: a folder of PEFT checkpoint-* folders, or "
                             "adapter directories in training order (e.g. initial and final); "
                             "several folders of checkpoint-* folders: those runs overlaid")
    parser.add_argument("--label", metavar="NAME", action="append",
                        help="with several runs under --checkpoints: each run's label (e.g. its "
                             "domain and learning rate), one per run in order; default: folder names")
    parser.add_argument("--base", metavar="DIR",
                        help="local base model directory (config.json + safetensors): adds relative "
                             "change, amplification, intruder dimensions, DoRA and modules_to_save ΔW")
    parser.add_argument("--out", metavar="DIR", default="tunelens-analysis",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--retune", action="store_true",
                        help="also write PEFT LoraConfig JSON files re-tuning only the top-1 "
                             "(soloist) and top-3 (ensemble) layers, attention and MLP, to OUT/retune")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--charts", action=argparse.BooleanOptionalAction, default=None,
                        help="--charts: also PNG copies of the report's charts in OUT/charts "
                             "(report.html draws them itself); default: analysis.png_charts in "
                             "conf.yaml, off unless set")


def run(args: argparse.Namespace) -> int:
    from tunelens.config import load_config
    from tunelens.registry_hooks.engine.analysis import analyze_adapter
    from tunelens.registry_hooks.engine import checkpoints, full_diff
    from tunelens.registry_hooks.report.outputs import write_analysis

    config, progress = load_config(args.config), not args.no_progress
    if args.label and not args.checkpoints:
        raise full_diff.AnalysisInputError("--label names the runs of --checkpoints")
    if args.checkpoints and len(args.checkpoints) > 1 and checkpoints.is_run_folder(
            args.checkpoints[0]):  # several runs, overlaid
        return _runs(args, config, progress)
    if args.checkpoints:  # training evolution
        result = checkpoints.analyze_checkpoints(args.checkpoints, args.base, config=config,
                                                 progress=progress)
        from tunelens.registry_hooks.report.checkpoints_page import write_checkpoints

        files = write_checkpoints(result, args.out, config=config)
    elif args.adapter is None:
        raise full_diff.AnalysisInputError("give an ADAPTER directory (or a fine-tuned model "
                                           "directory with --base), or --checkpoints PATH")
    elif full_diff.is_full_model_dir(args.adapter):  # a full fine-tune: diff every weight
        if not args.base:
            raise full_diff.AnalysisInputError(f"{args.adapter} is a full model directory, not an "
                                               "adapter: pass --base BASE_DIR to diff its weights")
        result = full_diff.diff_models(args.adapter, args.base, config=config, progress=progress)
        from tunelens.registry_hooks.report.full_diff_page import write_full_diff

        files = write_full_diff(result, args.out, config=config)
    else:
        result = analyze_adapter(args.adapter, args.base, config=config, progress=progress)
        files = write_analysis(result, args.out, config=config, charts=args.charts)
    if args.retune:
        from tunelens.registry_hooks.engine.retune import write_retune_configs

        retune = write_retune_configs(result, files.html_path.parent / "retune")
        print(f"wrote {len(retune)} LoraConfig files to {files.html_path.parent / 'retune'}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{len(result.modules)} modules analysed; wrote {files.json_path}, {files.html_path} and "
          f"{len(files.chart_paths)} charts")
    return 0


def _runs(args: argparse.Namespace, config: Settings, progress: bool) -> int:
    from tunelens.registry_hooks.engine.checkpoints import training_runs
    from tunelens.registry_hooks.report.runs_page import write_runs

    runs = training_runs(args.checkpoints, args.label, config=config, progress=progress)
    json_path, html_path, charts = write_runs(runs, args.out)
    print(f"{len(runs.runs)} runs overlaid; wrote {json_path}, {html_path} and {len(charts)} charts")
    return 0
