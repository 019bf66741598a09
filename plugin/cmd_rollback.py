"""`tunelens rollback NAME`: move an alias back to the version it pointed at before the last promote."""
from __future__ import annotations

import argparse

from tunelens.plugin.cmd_promote import add_registry_arguments, alias_for, registry_client

HELP = ("point a registry alias (default: production) back at its previous holder, as recorded by "
        "`tunelens promote`; exit 1 and change nothing when none is recorded")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model name")
    add_registry_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tunelens.evaluators.promotion import rollback

    with registry_client(args) as client:
        result = rollback(client, args.name, alias_for(args))
    print(result.describe())
    return 0
