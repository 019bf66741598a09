"""`tunelens rollback NAME`: move an alias back to the version it pointed at before the last promote."""
from __future__ import annotations

import argparse

from tunelens.config import load_config
from tunelens.plugin.cmd_promote import add_registry_arguments, registry_client

HELP = ("point a registry alias (default: production) back at its previous holder, as recorded by "
        "`tunelens promote`; exit 1 and change nothing when none is recorded")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model name")
    add_registry_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tunelens.registry.promotion import Gatekeeper, rollback

    gate = Gatekeeper.from_config(load_config(args.config))
    with registry_client(args) as client:
        result = rollback(client, gate, args.name, args.alias)
    print(result.describe())
    return 0
