"""The webhook receiver: verify an MLflow delivery, answer at once, hand (name, version) on.

MLflow signs `f"{delivery_id}.{timestamp}.{raw_body}"` with HMAC-SHA256 under the webhook's secret
and sends `X-MLflow-Signature: v1,<base64>` (mlflow/webhooks/delivery.py). A delivery is refused
when it is unsigned or the signature does not match (401), older or further ahead than max_age
(401: a captured delivery cannot be replayed later), a delivery id already accepted within max_age
(409), or larger than max_body_bytes (413, unread). Only then is the body parsed.

A flood of forged requests must not delay real deliveries: each connection has its own thread, a
rejection costs one HMAC, a connection that stalls is dropped after `read_timeout` seconds, and
rejections are logged as one summary line per interval instead of one line each.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

DELIVERY_ID = "X-MLflow-Delivery-Id"
TIMESTAMP = "X-MLflow-Timestamp"
SIGNATURE = "X-MLflow-Signature"
EVENT = ("model_version", "created")

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
    """A small threaded HTTP server on POST /webhook; `on_version(name, version)` must not block."""

    def __init__(self, host: str, port: int, secret: str, on_version: Callable[[str, str], None],
                 *, max_body_bytes: int, max_age: float, read_timeout: float = 10.0):
        self.secret = secret
        self.on_version = on_version
        self.max_body_bytes = max_body_bytes
        self.max_age = max_age
        self.replay = ReplayGuard(max_age)
        self.accepted = 0
        self.rejected = 0
        self.rejections = RejectionLog()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = read_timeout  # a client that stalls mid-request cannot hold its thread

            def do_POST(self):  # noqa: N802 - http.server's naming
                status, message = receiver.handle(self.path, self.headers, self._read_body)
                data = json.dumps({"status": status, "message": message}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                ok = self.path == "/health"
                data = b"OK" if ok else b"not found"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read_body(self) -> bytes | None:
                length = self.headers.get("Content-Length") or "0"
                if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True
                    raise DeliveryRejected(400, f"bad Content-Length {length[:40]!r}")
                if int(length) > receiver.max_body_bytes:
                    return None
                return self.rfile.read(int(length))

            def log_message(self, fmt, *args):
                log.debug("webhook receiver: " + fmt, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

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
        return 200, f"ignored event {delivery.entity}.{delivery.action}"

    def start(self) -> "WebhookReceiver":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="tunelens-webhook",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
