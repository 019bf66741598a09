"""`tunelens server`: MLflow tracking server + hook service + worker, analysing every LoRA version."""
from __future__ import annotations

import argparse

from tunelens.config import load_config

HELP = ("run a real MLflow tracking server with the tunelens hook service: every registered LoRA "
        "version is analysed automatically")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: conf server.host, "
                        "127.0.0.1)")
    parser.add_argument("--port", type=int, help="MLflow port (default: conf server.port, 5000)")
    parser.add_argument("--data-dir", metavar="DIR", help="mlflow.db, artifacts and the webhook "
                        "encryption key (default: conf server.data_dir)")
    parser.add_argument("--backend-store-uri", metavar="URI", help="any SQLAlchemy URI, e.g. "
                        "postgresql+psycopg2://user@host/db (default: sqlite in the data dir)")


def run(args: argparse.Namespace) -> int:
    from tunelens.plugin.cmd_hooks import configure_logging
    from tunelens.registry_hooks.service.embedded import EmbeddedServer

    configure_logging()
    return EmbeddedServer(load_config(args.config), host=args.host, port=args.port,
                          data_dir=args.data_dir, backend_store_uri=args.backend_store_uri).run()
