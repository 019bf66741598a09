"""The webhook receiver: verify an MLflow delivery, answer at once, hand (name, version) on.

MLflow signs `f"{delivery_id}.{timestamp}.{raw_body}"` with HMAC-SHA256 under the webhook's secret
and sends `X-MLflow-Signature: v1,<base64>` (mlflow/webhooks/delivery.py). A delivery is refused
when it is unsigned or the signature does not match (401), older or further ahead than max_age
(401: a captured delivery cannot be replayed later), a delivery id already accepted within max_age
(409), or larger than max_body_bytes (413, unread). Only then is the body parsed.

It is a Starlette app served by uvicorn (both come with MLflow) on a thread of the hook service.
A flood of forged requests must not delay real deliveries: connections are asyncio tasks, not
threads, a rejection costs one HMAC, a body that stalls is answered 408 and the connection closed
after `read_timeout` seconds, a malformed request (a Content-Length that is not a plain number,
say) is refused 400 by uvicorn's HTTP parser before it reaches the app, and rejections are logged
as one summary line per interval instead of one line each.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

DELIVERY_ID = "X-MLflow-Delivery-Id"
TIMESTAMP = "X-MLflow-Timestamp"
SIGNATURE = "X-MLflow-Signature"
EVENT = ("model_version", "created")
ALIAS_ENTITY = "model_version_alias"  # created / deleted: the alias guard checks the alias

log = logging.getLogger(__name__)


class DeliveryRejected(Exception):
    """Why a delivery was refused, with the HTTP status to answer."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """v1,base64(HMAC-SHA256(secret, delivery_id.timestamp.body)): MLflow's signature."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class ReplayGuard:
    """Delivery ids accepted within the last max_age seconds (older ones fail the age check)."""

    def __init__(self, max_age: float):
        self.max_age = max_age
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def accept(self, delivery_id: str, now: float) -> bool:
        """Record the id; False if it was already accepted."""
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * self.max_age:
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            return True


@dataclass(frozen=True)
class Delivery:
    delivery_id: str
    entity: str
    action: str
    data: dict


def verify_delivery(headers, body: bytes, secret: str, replay: ReplayGuard, max_age: float,
                    now: float | None = None) -> Delivery:
    """The parsed delivery, or DeliveryRejected saying why not."""
    now = time.time() if now is None else now
    delivery_id, timestamp = headers.get(DELIVERY_ID), headers.get(TIMESTAMP)
    signature = headers.get(SIGNATURE)
    if not (delivery_id and timestamp and signature):
        raise DeliveryRejected(401, f"unsigned delivery: {DELIVERY_ID}, {TIMESTAMP} and "
                                    f"{SIGNATURE} are all required")
    expected = sign(secret, delivery_id, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise DeliveryRejected(401, "signature does not match the webhook secret")
    try:
        sent_at = float(timestamp)
    except ValueError:
        raise DeliveryRejected(401, f"{TIMESTAMP} is not a unix time") from None
    if abs(now - sent_at) > max_age:
        raise DeliveryRejected(401, f"stale delivery: sent {now - sent_at:.0f} s ago, more than "
                                    f"{max_age:.0f} s")
    if not replay.accept(delivery_id, now):
        raise DeliveryRejected(409, f"replayed delivery id {delivery_id}")
    try:
        payload = json.loads(body)
        return Delivery(delivery_id, payload["entity"], payload["action"], payload.get("data") or {})
    except (ValueError, KeyError, TypeError):
        raise DeliveryRejected(400, "body is not an MLflow webhook payload") from None


class RejectionLog:
    """Logs the first rejection, then at most one summary line per `interval` seconds."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._counts: dict[str, int] = {}
        self._last = -float("inf")
        self._lock = threading.Lock()

    def add(self, status: int, reason: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            kind = f"{status} {reason.split(':')[0]}"
            self._counts[kind] = self._counts.get(kind, 0) + 1
            if now - self._last < self.interval:
                return
            counts, self._counts, self._last = self._counts, {}, now
        total = sum(counts.values())
        detail = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))
        log.warning("webhook: rejected %d deliver%s (%s)", total, "y" if total == 1 else "ies",
                    detail)


class WebhookReceiver:
    """POST /webhook (and GET /health) on uvicorn; `on_version(name, version)` and
    `on_alias(name, alias)` must not block."""

    def __init__(self, host: str, port: int, secret: str, on_version: Callable[[str, str], None],
                 *, max_body_bytes: int, max_age: float, read_timeout: float = 10.0,
                 on_alias: Callable[[str, str], None] | None = None):
        self.secret = secret
        self.on_version = on_version
        self.on_alias = on_alias
        self.max_body_bytes = max_body_bytes
        self.max_age = max_age
        self.read_timeout = read_timeout
        self.replay = ReplayGuard(max_age)
        self.accepted = 0
        self.rejected = 0
        self.rejections = RejectionLog()
        # Bound now, so the port (0 = any free one) is known before start().
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST"])])
        self.server = uvicorn.Server(uvicorn.Config(
            app, lifespan="off", access_log=False, log_level="warning", log_config=None,
            timeout_keep_alive=int(read_timeout), timeout_graceful_shutdown=2))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    async def _endpoint(self, request: Request) -> Response:
        if request.method == "GET":
            ok = request.url.path == "/health"
            return PlainTextResponse("OK" if ok else "not found", status_code=200 if ok else 404)
        if request.url.path.rstrip("/") != "/webhook":
            return JSONResponse({"status": 404, "message": "not found"}, status_code=404,
                                headers={"Connection": "close"})
        try:
            body = await self._read_body(request)
            status, message = self.handle(request.url.path, request.headers, lambda: body)
        except TimeoutError:
            status, message = 408, f"stalled: body not received within {self.read_timeout:g} s"
            self.rejected += 1
            self.rejections.add(status, message)
        return JSONResponse({"status": status, "message": message}, status_code=status,
                            headers={"Connection": "close"} if status >= 400 else None)

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None when it is (or announces to be) over max_body_bytes: not read on."""
        length = request.headers.get("content-length")
        if length is not None and int(length) > self.max_body_bytes:  # h11 checked it is digits
            return None
        body = bytearray()
        async with asyncio.timeout(self.read_timeout):  # a client that stalls mid-body
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body_bytes:
                    return None
        return bytes(body)

    def handle(self, path: str, headers, read_body: Callable[[], bytes | None]) -> tuple[int, str]:
        if path.rstrip("/") != "/webhook":
            return 404, "not found"
        try:
            body = read_body()
            if body is None:
                raise DeliveryRejected(413, f"body larger than {self.max_body_bytes} bytes")
            delivery = verify_delivery(headers, body, self.secret, self.replay, self.max_age)
        except DeliveryRejected as exc:
            self.rejected += 1
            self.rejections.add(exc.status, exc.reason)
            return exc.status, exc.reason
        self.accepted += 1
        if (delivery.entity, delivery.action) == EVENT and delivery.data.get("name"):
            self.on_version(str(delivery.data["name"]), str(delivery.data["version"]))
            return 200, "queued"
        if (delivery.entity == ALIAS_ENTITY and self.on_alias is not None
                and delivery.data.get("name") and delivery.data.get("alias")):
            self.on_alias(str(delivery.data["name"]), str(delivery.data["alias"]))
            return 200, "alias queued for the gate"
        return 200, f"ignored event {delivery.entity}.{delivery.action}"

    def start(self) -> "WebhookReceiver":
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="tunelens-webhook", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._socket.close()
