"""`tunelens hooks`: the hook service and worker against an MLflow server that already runs."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from tunelens.config import load_config, with_changes
from tunelens.plugin.cli import add_tracking_uri_argument, tracking_uri

HELP = ("run only the tunelens hook service (webhook receiver, worker, reconciling scan) against "
        "an existing MLflow server")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_tracking_uri_argument(parser)
    parser.add_argument("--host", help="webhook receiver address (default: conf hooks.host)")
    parser.add_argument("--port", type=int, help="webhook receiver port (default: conf "
                        "hooks.port; 0 = any free port)")
    parser.add_argument("--public-url", metavar="URL", help="URL the MLflow server posts "
                        "deliveries to (default: http://HOST:PORT/webhook)")
    parser.add_argument("--no-webhook", action="store_true", help="do not create or update the "
                        "MLflow webhook; rely on the reconciling scan only")


def run(args: argparse.Namespace) -> int:
    from tunelens.registry_hooks.service.service import HookService

    uri = tracking_uri(args, required=True)
    configure_logging()
    given = {"host": args.host, "port": args.port, "public_url": args.public_url}
    config = with_changes(load_config(args.config),
                          {"hooks": {key: value for key, value in given.items() if value is not None}},
                          "--host/--port/--public-url")
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    service = HookService(uri, config, register_webhook=not args.no_webhook).start()
    print(f"tunelens hooks: watching {uri}; webhooks on {service.webhook_url}",
          file=sys.stderr, flush=True)
    try:
        while not stopped.wait(1):
            pass
    finally:
        service.stop()
    print("tunelens hooks: stopped", file=sys.stderr, flush=True)
    return 0
