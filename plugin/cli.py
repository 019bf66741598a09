"""The `tunelens` command: one entry point, one thin module per subcommand.

Each subcommand module in this package exposes `HELP`, `add_arguments(parser)` and `run(args) -> int`;
it parses flags and calls into `tunelens.registry_hooks` or `tunelens.evaluators`, where the work is.
Modules are imported only when their subcommand runs, so `tunelens --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from tunelens import __version__
from tunelens.config import ConfigError
from tunelens.errors import TunelensError

# name -> module under tunelens.plugin holding HELP / add_arguments / run
SUBCOMMANDS = {
    "evaluate": "cmd_evaluate",
    "analyze": "cmd_analyze",
    "promote": "cmd_promote",
    "rollback": "cmd_rollback",
    "server": "cmd_server",
    "hooks": "cmd_hooks",
    "log-adapter": "cmd_log_adapter",
    "compare": "cmd_compare",
    "demo": "cmd_demo",
}


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def add_tracking_uri_argument(parser: argparse.ArgumentParser) -> None:
    """--tracking-uri for every subcommand that talks to MLflow; $MLFLOW_TRACKING_URI by default."""
    parser.add_argument("--tracking-uri", metavar="URI", help="the MLflow tracking/registry "
                        f"server, e.g. http://127.0.0.1:5000 (default: ${TRACKING_URI_ENV})")


def tracking_uri(args: argparse.Namespace, *, required: bool = False) -> str | None:
    """--tracking-uri, else $MLFLOW_TRACKING_URI; also made MLflow's default for this process."""
    uri = args.tracking_uri or os.environ.get(TRACKING_URI_ENV) or None
    if uri is None:
        if required:
            raise TunelensError(f"no MLflow server given: pass --tracking-uri URI or set "
                                f"{TRACKING_URI_ENV}")
        return None
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def _load(name: str):
    return importlib.import_module(f"tunelens.plugin.{SUBCOMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelens", description="LoRA weight analysis and "
                                     "side-by-side evaluation for MLflow.")
    parser.add_argument("--version", action="version", version=f"tunelens {__version__}")
    parser.add_argument("--config", metavar="FILE", help="settings merged over conf.yaml's defaults")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = _load(name)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from tunelens.plugin.install_check import check_torch_extensions

        check_torch_extensions()
        return _load(args.command).run(args) or 0
    except (TunelensError, ConfigError) as exc:
        print(f"tunelens {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"tunelens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
