"""`tunelens demo`: a grammar-correction fine-tune's whole story on the embedded server, generated locally, no GPU needed."""
from __future__ import annotations

import argparse
from pathlib import Path

from tunelens.config import load_config

HELP = ("train two grammar-correcting LoRAs on a tiny local base, register them, watch tunelens "
        "analyse them, compare them and promote the recommended one; serves the MLflow UI until "
        "Ctrl-C")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR", default="tunelens-data",
                        help="demo models, mlflow.db and artifacts (default: ./tunelens-data; "
                             "models are built once and reused)")
    parser.add_argument("--port", type=int, help="MLflow port (default: conf server.port, 5000)")
    parser.add_argument("--no-serve", dest="serve", action="store_false",
                        help="exit when the story is done instead of serving the UI")
    parser.add_argument("--verbose", action="store_true", help="show engine and library logs on "
                        "the console (default: DATA_DIR/demo.log)")


def run(args: argparse.Namespace) -> int:
    from tunelens.console import quiet_console
    from tunelens.demo.story import run_demo, say

    log_path = Path(args.data_dir).expanduser().resolve() / "demo.log"
    if not args.verbose:
        say(f"engine and library logs go to {log_path} (--verbose shows them here)")
    with quiet_console(log_path, args.verbose):
        return run_demo(load_config(args.config), Path(args.data_dir), args.port, args.serve)
