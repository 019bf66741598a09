"""Guarded aliases where only webhooks reach tunelens: a plain `mlflow server` (no tunelens registry
store) and a real `tunelens hooks` process. MLflow writes every alias move; the hook service undoes
the ones the gate refuses (REJECT, stale PROMOTE, never evaluated; from MlflowClient, the REST API
and the MLflow UI's alias editor in a real browser), keeps a PROMOTE move and `--force --reason`,
and rollback restores."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
import requests
from mlflow import MlflowClient

from support.hooks_support import HooksProcess, write_config
from support.mlflow_server import MlflowServer
from support.ui_checks import CHROMIUM, add_alias_in_ui
from support.verdicts import CURRENT, new_versions, sign_verdict
from tunelens.registry import promotion
from tunelens.registry.gate import deleted_holder_tag
from tunelens.registry.promotion import Gatekeeper, approved_holder, approved_tag
from tunelens.registry_hooks.service.alias_guard import undone_tag

GATE = Gatekeeper.from_config(None)
SECRET = "alias-guard-secret"


@pytest.fixture(scope="module")
def hooked_server(tmp_path_factory):
    """(server, hooks): a plain MLflow server delivering webhooks to a `tunelens hooks` process."""
    root = tmp_path_factory.mktemp("alias-guard")
    with MlflowServer(root / "mlflow", allow_loopback_webhooks=True) as server:
        hooks = HooksProcess(server.url, write_config(root / "hooks.yaml"), root / "hooks.log",
                             secret=SECRET)
        try:
            yield server, hooks
        finally:
            assert hooks.stop() == 0, hooks.log_tail()


@pytest.fixture()
def model(hooked_server, tmp_path):
    """(client, name, new_version): a fresh model on the hooked server."""
    client = MlflowClient(hooked_server[0].url)
    name = f"hooked-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    return client, name, lambda: new_versions(client, name, tmp_path / "files", 1)[0]


def wait_for(condition, what: str, hooks: HooksProcess, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what} not seen in {timeout} s\n{hooks.log_tail()}"
        time.sleep(0.1)
    return found


def set_by_client(server, client, name, version):
    client.set_registered_model_alias(name, "production", version)


def set_by_rest(server, client, name, version):
    answer = requests.post(f"{server.url}/api/2.0/mlflow/registered-models/alias",
                           json={"name": name, "alias": "production", "version": version},
                           timeout=30)
    assert answer.status_code == 200, answer.text  # MLflow alone writes it


def holder(client, name):
    return client.get_registered_model(name).aliases.get("production")


def cli(server, *args) -> str:
    out = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", *args, "--tracking-uri",
                          server.url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_refused_moves_are_undone_and_allowed_ones_stay(hooked_server, model):
    server, hooks = hooked_server
    client, name, new_version = model
    v1, rejected, never, stale, better = (new_version() for _ in range(5))
    sign_verdict(client, name, v1, "PROMOTE", holder=CURRENT)
    promotion.promote(client, GATE, name, v1)
    assert approved_holder(GATE, client.get_registered_model(name), "production").version == v1
    sign_verdict(client, name, rejected, "REJECT", holder=CURRENT, reasons="REJECT: worse than v1")
    sign_verdict(client, name, stale, "PROMOTE", holder="none")  # made before v1 held it
    sign_verdict(client, name, better, "PROMOTE", holder=CURRENT)

    for version, says in ((rejected, "its verdict is REJECT, not PROMOTE"),
                          (never, "it was never evaluated"),
                          (stale, f"evaluated against no version holding it but v{v1} holds")):
        for door in (set_by_client, set_by_rest):
            if undone_tag("production") in client.get_model_version(name, version).tags:
                client.delete_model_version_tag(name, version, undone_tag("production"))
            door(server, client, name, version)
            said = wait_for(lambda: client.get_model_version(name, version).tags.get(
                undone_tag("production")), f"the undo of v{version} ({door.__name__})", hooks)
            assert says in said and f"put back on version {v1}" in said, said
            assert holder(client, name) == v1
            description = client.get_model_version(name, version).description
            assert "move undone" in description and says in description
        assert f"{name}@production -> v{version} undone" in hooks.log_tail(100_000)

    set_by_rest(server, client, name, better)  # PROMOTE covering v1: allowed
    wait_for(lambda: approved_holder(GATE, client.get_registered_model(name), "production")
             .version == better, "the PROMOTE move accepted", hooks)
    time.sleep(2)
    assert holder(client, name) == better
    assert undone_tag("production") not in client.get_model_version(name, better).tags

    # break glass on the record: allowed and kept; rollback restores the holder before it
    cli(server, "promote", name, rejected, "--force", "--reason", "hotfix: base outage")
    wait_for(lambda: approved_holder(GATE, client.get_registered_model(name), "production")
             .version == rejected, "the forced move recorded", hooks)
    time.sleep(2)
    assert holder(client, name) == rejected
    assert "rolled back to version " + better in cli(server, "rollback", name)
    time.sleep(2)
    assert holder(client, name) == better
    assert approved_holder(GATE, client.get_registered_model(name), "production").version == better


def test_no_holder_means_the_alias_is_removed_and_a_forged_record_counts_for_nothing(
        hooked_server, model):
    server, hooks = hooked_server
    client, name, new_version = model
    never, champion = new_version(), new_version()
    client.set_registered_model_tag(name, approved_tag("production"),
                                    f'{{"version": "{never}", "present": true, "signature": "x"}}')
    set_by_client(server, client, name, never)
    said = wait_for(lambda: client.get_model_version(name, never).tags.get(
        undone_tag("production")), "the undo", hooks)
    assert "removed (it was unset before)" in said and "never evaluated" in said
    assert holder(client, name) is None

    # a deleted alias keeps its holder to beat: a verdict made while nobody held it is stale
    sign_verdict(client, name, champion, "PROMOTE", holder=CURRENT)
    promotion.promote(client, GATE, name, champion)
    client.delete_registered_model_alias(name, "production")
    wait_for(lambda: client.get_registered_model(name).tags.get(deleted_holder_tag("production"))
             == champion, "the deleted holder recorded", hooks)
    stale = new_version()
    sign_verdict(client, name, stale, "PROMOTE", holder="none")
    set_by_rest(server, client, name, stale)
    said = wait_for(lambda: client.get_model_version(name, stale).tags.get(
        undone_tag("production")), "the undo after a delete", hooks)
    assert f"v{champion} holds production now" in said and "removed" in said
    assert holder(client, name) is None


def test_a_move_whose_delivery_was_lost_is_undone_by_the_next_sweep(hooked_server, model):
    """MLflow does not retry a delivery: with the webhook off (as if the receiver had been down),
    a refused move is still undone, by the guard's periodic check."""
    server, hooks = hooked_server
    client, name, new_version = model
    champion, rejected = new_version(), new_version()
    sign_verdict(client, name, champion, "PROMOTE", holder=CURRENT)
    promotion.promote(client, GATE, name, champion)
    sign_verdict(client, name, rejected, "REJECT", holder=CURRENT)
    webhook = next(h for h in client.list_webhooks() if h.name == "tunelens-analysis")
    client.update_webhook(webhook.webhook_id, status="DISABLED")
    try:
        time.sleep(2)  # the server's webhook cache (1 s in tests) sees it off
        set_by_client(server, client, name, rejected)
        said = wait_for(lambda: client.get_model_version(name, rejected).tags.get(
            undone_tag("production")), "the undo by the sweep", hooks)
        assert f"put back on version {champion}" in said
        assert holder(client, name) == champion
    finally:
        client.update_webhook(webhook.webhook_id, status="ACTIVE")


def test_an_earlier_holder_record_written_back_does_not_bring_its_holder_back(hooked_server, model):
    """The holder records are signed, so a saved one still verifies: written back after a newer
    one, it is older than the newest the guard has seen, and the guard keeps to the newest."""
    server, hooks = hooked_server
    client, name, new_version = model
    first, second = new_version(), new_version()
    sign_verdict(client, name, first, "PROMOTE", holder=CURRENT)
    promotion.promote(client, GATE, name, first)
    saved = client.get_registered_model(name).tags[approved_tag("production")]
    sign_verdict(client, name, second, "PROMOTE", holder=CURRENT)
    promotion.promote(client, GATE, name, second)
    time.sleep(3)  # the webhook and a sweep (hooks.poll_interval: 2 s) read the second record

    client.set_registered_model_tag(name, approved_tag("production"), saved)
    assert approved_holder(GATE, client.get_registered_model(name), "production").version == first
    set_by_client(server, client, name, first)
    said = wait_for(lambda: client.get_model_version(name, first).tags.get(
        undone_tag("production")), "the undo of the replayed holder", hooks)
    assert f"put back on version {second}" in said, said
    assert holder(client, name) == second
    assert approved_holder(GATE, client.get_registered_model(name), "production").version == second


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_alias_editor_s_refused_move_is_undone_and_the_version_page_says_why(
        hooked_server, model, tmp_path):
    """Without the registry store MLflow accepts the UI's write (no alert); the hook service puts
    the alias back on the holder and the version's description says what was undone."""
    server, hooks = hooked_server
    client, name, new_version = model
    champion, rejected = new_version(), new_version()
    sign_verdict(client, name, champion, "PROMOTE", holder=CURRENT)
    promotion.promote(client, GATE, name, champion)
    sign_verdict(client, name, rejected, "REJECT", holder=CURRENT, reasons="REJECT: worse")

    alert = add_alias_in_ui(server.url, name, rejected, "production", tmp_path / "editor.png")
    assert alert == ""
    said = wait_for(lambda: client.get_model_version(name, rejected).tags.get(
        undone_tag("production")), "the undo of the UI's move", hooks)
    assert "its verdict is REJECT, not PROMOTE" in said and f"put back on version {champion}" in said
    assert holder(client, name) == champion
    assert "move undone" in client.get_model_version(name, rejected).description
