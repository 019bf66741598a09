"""Webhook deliveries: only signed, fresh, first-seen ones are accepted; nothing else is analysed."""
from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient

from support.hooks_support import (analysis_runs, deliveries_only_hooks, delivery, post, register,
                           wait_status)
from support.mlflow_server import MlflowServer
from support.reliability import raw_post
from tunelens.registry_hooks.service.state import STATUS
from tunelens.registry_hooks.service.webhook import WebhookReceiver

SECRET = "s3cret-for-tests"


@pytest.fixture
def receiver():
    calls = []
    rx = WebhookReceiver("127.0.0.1", 0, SECRET, lambda n, v: calls.append((n, v)),
                         max_body_bytes=4096, max_age=300, read_timeout=1).start()
    rx.calls = calls
    yield rx
    rx.stop()


def test_receiver_rejects_forged_unsigned_stale_replayed_and_oversized(receiver):
    url = f"http://127.0.0.1:{receiver.port}/webhook"
    assert post(url, *delivery("wrong-secret", "m", "1")) == 401
    assert post(url, *delivery(None, "m", "1")) == 401
    assert post(url, *delivery(SECRET, "m", "1", timestamp=int(time.time()) - 301)) == 401
    assert post(url, *delivery(SECRET, "m", "1", timestamp=int(time.time()) + 301)) == 401
    headers, body = delivery(SECRET, "m", "1")
    tampered = body.replace(b'"version": "1"', b'"version": "2"')
    assert post(url, headers, tampered) == 401
    big_headers, _ = delivery(SECRET, "m", "1")
    assert post(url, big_headers, b"x" * 5000) == 413
    assert receiver.calls == []
    assert post(url, headers, body) == 200
    assert post(url, headers, body) == 409  # the same delivery id again: a replay
    assert receiver.calls == [("m", "1")]
    assert (receiver.accepted, receiver.rejected) == (1, 7)
    # A Content-Length that is not a plain non-negative number is a 400 from the HTTP parser,
    # before the app: nothing reaches the handler.
    for length in ("-5", "abc", "\u00b2"):
        assert raw_post(url, length, b"{}") == 400, length
    assert receiver.rejected == 7 and receiver.calls == [("m", "1")]
    # A body announced but not sent is answered 408 after the read timeout.
    started = time.monotonic()
    assert raw_post(url, "100", b"{" * 10) == 408
    assert 0.5 <= time.monotonic() - started < 10 and receiver.rejected == 8


def test_forged_stale_and_replayed_deliveries_analyse_nothing(tmp_path, llama_adapter):
    """A real MLflow server and a real `tunelens hooks` process (webhook off, scan at start only)."""
    with MlflowServer(tmp_path / "mlflow") as server:
        client = MlflowClient(server.url)
        hooks = deliveries_only_hooks(server.url, tmp_path, SECRET)
        try:
            version = register(client, "victim", llama_adapter)
            for headers, body in (delivery("forged", "victim", version),
                                  delivery(None, "victim", version),
                                  delivery(SECRET, "victim", version,
                                           timestamp=int(time.time()) - 600)):
                assert post(hooks.url, headers, body) == 401
            time.sleep(3)
            assert STATUS not in client.get_model_version("victim", version).tags
            assert analysis_runs(client, "victim", version) == []

            headers, body = delivery(SECRET, "victim", version)
            assert post(hooks.url, headers, body) == 200
            tags = wait_status(client, "victim", version)
            assert tags[STATUS] == "done", hooks.log_tail()
            assert post(hooks.url, headers, body) == 409
            for _ in range(3):  # duplicate deliveries (new ids) of the same event
                assert post(hooks.url, *delivery(SECRET, "victim", version)) == 200
            time.sleep(3)
            runs = analysis_runs(client, "victim", version)
            assert [r.info.run_id for r in runs] == [tags["tunelens.analysis.run_id"]]
            assert client.get_model_version("victim", version).tags == tags
        finally:
            assert hooks.stop() == 0, hooks.log_tail()
