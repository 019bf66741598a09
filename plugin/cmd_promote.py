"""`tunelens promote NAME VERSION`: move an alias to a version whose verdict is PROMOTE and covered
the alias's current holder."""
from __future__ import annotations

import argparse
import contextlib

from tunelens.config import load_config
from tunelens.errors import TunelensError
from tunelens.plugin.cli import add_tracking_uri_argument, tracking_uri

HELP = ("point a registry alias (default: production) at a model version, only if its "
        "tunelens.verdict tag is PROMOTE and that verdict compared it with the alias's current "
        "holder; exit 1 and change nothing otherwise")


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    """--alias and --tracking-uri, shared with `tunelens rollback`."""
    parser.add_argument("--alias", help="the alias to move (default: conf promotion.alias, "
                        "'production')")
    add_tracking_uri_argument(parser)


@contextlib.contextmanager
def registry_client(args: argparse.Namespace):
    """An MlflowClient for --tracking-uri; MLflow's own errors come out as one clear line."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        yield MlflowClient(tracking_uri=tracking_uri(args))
    except MlflowException as exc:
        raise TunelensError(f"MLflow refused the request: {exc.message.splitlines()[0]}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model name")
    parser.add_argument("version", help="model version number")
    add_registry_arguments(parser)
    parser.add_argument("--force", action="store_true", help="promote whatever the verdict; needs "
                        "--reason")
    parser.add_argument("--reason", metavar="TEXT", help="why the verdict is overridden; recorded "
                        "in the version's tag tunelens.promotion.<alias>.reason")


def run(args: argparse.Namespace) -> int:
    from tunelens.registry.promotion import Gatekeeper, promote

    gate = Gatekeeper.from_config(load_config(args.config))
    with registry_client(args) as client:
        result = promote(client, gate, args.name, args.version, args.alias, force=args.force,
                         reason=args.reason)
    print(result.describe())
    return 0
