"""`tunelens log-adapter`: log a PEFT LoRA adapter as an MLflow transformers model and register it."""
from __future__ import annotations

import argparse
import sys

from tunelens.plugin.cli import add_tracking_uri_argument, tracking_uri

HELP = "log a PEFT LoRA adapter (adapter only, on a local base) as an MLflow model and register it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", help="PEFT adapter directory (adapter_config.json)")
    parser.add_argument("--base", metavar="DIR", help="local base model directory (default: the "
                        "adapter's base_model_name_or_path when it is a local directory)")
    parser.add_argument("--name", dest="registered_model_name", metavar="NAME",
                        help="registered model name (omit to log without registering)")
    add_tracking_uri_argument(parser)
    parser.add_argument("--task", default="text-generation", help="transformers pipeline task")


def run(args: argparse.Namespace) -> int:
    from tunelens.registry_hooks.service.log_adapter import log_adapter

    logged = log_adapter(args.adapter_dir, args.base, task=args.task,
                         registered_model_name=args.registered_model_name,
                         tracking_uri=tracking_uri(args))
    where = (f"registered as {logged.registered_model_name} version {logged.version}"
             if logged.registered_model_name else "not registered")
    print(f"logged {logged.model_uri} (run {logged.run_id}); {where}", file=sys.stderr)
    print(logged.model_uri)
    return 0
