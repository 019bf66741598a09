"""The hook service: webhook receiver + worker + reconciling scan against one MLflow server.

`tunelens hooks --tracking-uri URI` runs it alone; `tunelens server` runs it beside an embedded
MLflow server. It creates or updates its MLflow webhook (model_version.created, and the alias
events its alias guard undoes refused moves on) with a secret generated at each start, so only
this process can verify deliveries. Beside a registry store that holds the guarded aliases itself
(`tunelens server`), the alias guard is off: the store refuses such a move before it is written.
"""
from __future__ import annotations

import logging
import os
import secrets
import urllib.error
import urllib.request

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tunelens.errors import TunelensError

from tunelens.registry.promotion import Gatekeeper
from tunelens.settings import Settings

from .alias_guard import ALIAS_EVENTS, AliasGuard
from .webhook import WebhookReceiver
from .worker import Worker

log = logging.getLogger(__name__)

WEBHOOK_EVENTS = ["model_version.created", *ALIAS_EVENTS]
SECRET_ENV = "TUNELENS_WEBHOOK_SECRET"


def ensure_webhook(client: MlflowClient, name: str, url: str, secret: str) -> str:
    """Create the named webhook, or point the existing one at `url` with `secret`; its id."""
    token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        for hook in page:
            if hook.name == name:
                client.update_webhook(hook.webhook_id, url=url, events=WEBHOOK_EVENTS,
                                      secret=secret, status="ACTIVE")
                return hook.webhook_id
        token = page.token
        if not token:
            break
    return client.create_webhook(name, url, WEBHOOK_EVENTS, secret=secret, status="ACTIVE",
                                 description="tunelens: analyse every registered LoRA version"
                                 ).webhook_id


class HookService:
    """Receiver, worker and scan; start() returns once deliveries can be received."""

    def __init__(self, tracking_uri: str, config: Settings, *, register_webhook: bool = True,
                 dead_workers: frozenset[str] = frozenset(), guard_aliases: bool = True):
        self.tracking_uri = tracking_uri
        self.config = config
        hooks = config.hooks
        # A fixed secret (several hook services behind one URL) comes from the environment, never
        # from a settings file; otherwise each start generates one and updates the webhook.
        self.secret = os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32)
        self.worker = Worker(tracking_uri, config, dead_workers=dead_workers)
        self.alias_guard = (AliasGuard(tracking_uri, Gatekeeper.from_config(config),
                                       self.worker.in_scope, float(hooks.poll_interval))
                            if guard_aliases else None)
        self.receiver = WebhookReceiver(hooks.host, int(hooks.port), self.secret,
                                        self.worker.enqueue,
                                        max_body_bytes=int(hooks.max_body_bytes),
                                        max_age=float(hooks.max_age_seconds),
                                        on_alias=self.alias_guard and self.alias_guard.watch)
        self.register_webhook = register_webhook
        self.webhook_id: str | None = None

    @property
    def webhook_url(self) -> str:
        hooks = self.config.hooks
        return hooks.public_url or f"http://{hooks.host}:{self.receiver.port}/webhook"

    def _check_reachable(self) -> None:
        """Fail in seconds with one line, not after the MLflow client's minutes of retries."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        try:
            with urllib.request.urlopen(f"{self.tracking_uri.rstrip('/')}/health", timeout=10):
                return
        except urllib.error.HTTPError:
            return  # it answers (health may sit behind auth); the API calls will tell
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TunelensError(f"cannot reach MLflow at {self.tracking_uri} ({reason}); check "
                                f"--tracking-uri and that the server runs") from None

    def start(self) -> "HookService":
        self._check_reachable()
        if self.alias_guard is not None:
            self.alias_guard.start()
        self.receiver.start()
        if self.register_webhook:
            try:
                self.webhook_id = ensure_webhook(MlflowClient(self.tracking_uri),
                                                 self.config.hooks.webhook_name,
                                                 self.webhook_url, self.secret)
            except MlflowException as exc:
                # A file store or an old server has no webhooks: the scan still finds everything.
                log.warning("no MLflow webhook (%s); relying on the scan every %s s",
                            exc.message.splitlines()[0], self.config.hooks.poll_interval)
        self.worker.start()
        log.info("tunelens hooks: receiving on %s, worker %s, analysing %s", self.webhook_url,
                 self.worker.owner, self.worker.scope.describe())
        return self

    def stop(self) -> None:
        """Stop receiving, then stop the worker (a job in progress resumes after its lease)."""
        self.receiver.stop()
        if self.alias_guard is not None:
            self.alias_guard.stop()
        self.worker.stop(timeout=5)
