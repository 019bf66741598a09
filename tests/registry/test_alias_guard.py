"""The gate inside the MLflow server: a real `mlflow server --registry-store-uri tunelens+...` refuses
a guarded alias move the verdict does not allow, from MlflowClient and from the REST API, refuses
verdict tags tunelens did not write, lets `--force --reason` and rollback through on the record,
and serialises racing writers on PostgreSQL."""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import uuid

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from support.mlflow_server import MlflowServer, postgres_database
from support.verdicts import CURRENT, sign_verdict
from tunelens.registry import promotion
from tunelens.registry.gate import deleted_holder_tag
from tunelens.registry.promotion import Gatekeeper, promotion_tag
from tunelens.registry.verdicts import STATEMENT_TAG, VERDICT_TAG

GATE = Gatekeeper.from_config(None)
IN_SCOPE = {"tunelens.enabled": "true"}  # outside `tunelens server`, models opt in with this tag


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("guarded")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with MlflowServer(root, uri, args=["--registry-store-uri", "tunelens+" + uri]) as server:
        yield server


def register_version(client, name: str, folder) -> str:
    """A run's artifact registered as a new version of `name` (what the version holds does not
    matter to the gate)."""
    folder = folder / "version-files"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    return client.create_model_version(name, f"{run.info.artifact_uri}/model",
                                       run_id=run.info.run_id).version


@pytest.fixture()
def model(guarded_server, tmp_path):
    """(client, name, new_version): a fresh opted-in model on the guarded server."""
    client = MlflowClient(guarded_server.url)
    name = f"gated-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name, tags=IN_SCOPE)
    return client, name, lambda: register_version(client, name, tmp_path)


def refused(call) -> str:
    with pytest.raises(MlflowException) as caught:
        call()
    return caught.value.message


def rest_set_alias(server, name, alias, version) -> requests.Response:
    return requests.post(f"{server.url}/api/2.0/mlflow/registered-models/alias",
                         json={"name": name, "alias": alias, "version": version}, timeout=30)


def test_every_door_is_refused_without_a_covering_promote(guarded_server, model):
    client, name, new_version = model
    v1, rejected, never, stale, better = (new_version() for _ in range(5))
    sign_verdict(client, name, v1, "PROMOTE", holder=CURRENT)
    client.set_registered_model_alias(name, "production", v1)  # nobody held it: PROMOTE suffices
    sign_verdict(client, name, rejected, "REJECT", holder=CURRENT, reasons="REJECT: worse than v1")
    sign_verdict(client, name, stale, "PROMOTE", holder="none")  # evaluated before v1 held it
    sign_verdict(client, name, better, "PROMOTE", holder=CURRENT)

    for version, says in ((rejected, "its verdict is REJECT, not PROMOTE"),
                          (never, "it was never evaluated"),
                          (stale, f"evaluated against no version holding it but v{v1} holds")):
        assert says in refused(lambda: client.set_registered_model_alias(name, "production",
                                                                           version))
        answer = rest_set_alias(guarded_server, name, "production", version)
        assert answer.status_code == 403 and says in answer.json()["message"]
        assert "tunelens evaluate" in answer.json()["message"]
        assert client.get_registered_model(name).aliases == {"production": v1}

    client.set_registered_model_alias(name, "staging", rejected)  # unguarded: MLflow's behaviour
    assert rest_set_alias(guarded_server, name, "production", better).status_code == 200
    assert client.get_registered_model(name).aliases == {"production": better,
                                                          "staging": rejected}


def test_verdict_tags_tunelens_did_not_write_are_refused_at_the_door(model):
    client, name, new_version = model
    rejected, promoted = new_version(), new_version()
    sign_verdict(client, name, rejected, "REJECT", holder=CURRENT)
    sign_verdict(client, name, promoted, "PROMOTE", holder=CURRENT)
    before = client.get_model_version(name, rejected).tags
    assert "verdict tag not written by tunelens" in refused(
        lambda: client.set_model_version_tag(name, rejected, VERDICT_TAG, "PROMOTE"))
    copied = client.get_model_version(name, promoted).tags[STATEMENT_TAG]
    assert f"copied from models:/{name}/{promoted}" in refused(
        lambda: client.set_model_version_tag(name, rejected, STATEMENT_TAG, copied))
    forged = json.loads(copied) | {"version": rejected}
    assert "signature does not check" in refused(
        lambda: client.set_model_version_tag(name, rejected, STATEMENT_TAG, json.dumps(forged)))
    assert "break-glass record not written by tunelens" in refused(
        lambda: client.set_model_version_tag(name, rejected, "tunelens.promotion.production."
                                             "override", "{}"))
    assert client.get_model_version(name, rejected).tags == before
    assert "its verdict is REJECT" in refused(
        lambda: client.set_registered_model_alias(name, "production", rejected))


def test_a_deleted_alias_keeps_its_holder_to_beat(model):
    client, name, new_version = model
    v1, old = new_version(), new_version()
    sign_verdict(client, name, old, "PROMOTE", holder=CURRENT)  # made while nobody held it
    sign_verdict(client, name, v1, "PROMOTE", holder=CURRENT)
    client.set_registered_model_alias(name, "production", v1)
    client.delete_registered_model_alias(name, "production")  # MLflow's behaviour: allowed
    model_now = client.get_registered_model(name)
    assert model_now.aliases == {} and model_now.tags[deleted_holder_tag("production")] == v1
    assert f"v{v1} holds production now" in refused(
        lambda: client.set_registered_model_alias(name, "production", old))
    # the record is the store's: nobody can point it at another version, or remove it
    assert "written by tunelens's registry store only" in refused(
        lambda: client.set_registered_model_tag(name, deleted_holder_tag("production"), old))
    assert "written by tunelens's registry store only" in refused(
        lambda: client.delete_registered_model_tag(name, deleted_holder_tag("production")))
    client.set_registered_model_alias(name, "production", v1)  # back to the one it had


def test_force_with_a_reason_is_the_way_around_and_it_is_audited(guarded_server, model):
    client, name, new_version = model
    champion, rejected = new_version(), new_version()
    sign_verdict(client, name, champion, "PROMOTE", holder=CURRENT)
    promotion.promote(client, GATE, name, champion)
    sign_verdict(client, name, rejected, "REJECT", holder=CURRENT)
    out = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "promote", name, rejected,
                          "--force", "--reason", "hotfix: base outage", "--tracking-uri",
                          guarded_server.url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert client.get_registered_model(name).aliases == {"production": rejected}
    tags = client.get_model_version(name, rejected).tags
    assert tags[promotion_tag("production", "forced")] == "true"
    assert tags[promotion_tag("production", "reason")] == "hotfix: base outage"
    assert tags[promotion_tag("production", "by")]
    audit = client.search_runs([client.get_experiment_by_name(GATE.audit_experiment)
                                .experiment_id], f"tags.`tunelens.model` = 'models:/{name}/"
                               f"{rejected}'")
    assert len(audit) == 1
    record = audit[0].data.tags
    assert (record["tunelens.audit.kind"], record["tunelens.audit.previous"],
            record["tunelens.audit.verdict_overridden"], record["tunelens.audit.reason"]) == (
        "force", champion, "REJECT", "hotfix: base outage")
    assert "**production**: this version holds it" in client.get_model_version(
        name, rejected).description
    # around the gate only through a break-glass record: a plain client move back is refused
    assert "its verdict is stale" in refused(
        lambda: client.set_registered_model_alias(name, "production", champion))
    restored = promotion.rollback(client, GATE, name)
    assert restored.restored == champion
    assert client.get_registered_model(name).aliases == {"production": champion}


def test_racing_writers_on_postgresql_never_leave_the_alias_on_a_refused_version(
        tmp_path, postgres_database_uri):
    """v1 holds production; v2 and v3 each have a PROMOTE covering v1. Once one of them takes the
    alias, the other's verdict is stale: many clients racing both through two server workers must
    leave the alias on the first winner, with every other writer refused."""
    with postgres_database("tunelens_gate_race") as uri:
        registry = "tunelens+postgresql://" + uri.split("://", 1)[1]
        with MlflowServer(tmp_path / "mlflow", uri, args=["--registry-store-uri", registry],
                          workers=2) as server:
            client = MlflowClient(server.url)
            for round_ in range(3):
                name = f"race-{round_}"
                client.create_registered_model(name, tags=IN_SCOPE)
                versions = [register_version(client, name, tmp_path) for _ in range(3)]
                sign_verdict(client, name, versions[0], "PROMOTE", holder=CURRENT)
                client.set_registered_model_alias(name, "production", versions[0])
                for version in versions[1:]:
                    sign_verdict(client, name, version, "PROMOTE", holder=CURRENT)
                writers = [versions[1 + i % 2] for i in range(16)]
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    answers = list(pool.map(
                        lambda v: rest_set_alias(server, name, "production", v), writers))
                holder = client.get_registered_model(name).aliases["production"]
                loser = versions[2] if holder == versions[1] else versions[1]
                assert holder in versions[1:]
                assert all(a.status_code == 200 for v, a in zip(writers, answers) if v == holder)
                assert all(a.status_code == 403 for v, a in zip(writers, answers) if v == loser)


def test_a_verdict_made_on_another_test_set_than_the_model_names_does_not_count(model, tmp_path):
    from tunelens.registry.datasets import content_digest, load_dataset
    from tunelens.registry.gate import EVAL_DATASET_TAG

    client, name, new_version = model
    named = tmp_path / "agreed.jsonl"
    named.write_text('{"inputs": "fix: he go", "targets": "He goes."}\n')
    client.set_registered_model_tag(name, EVAL_DATASET_TAG, str(named))
    shopped, agreed = new_version(), new_version()
    sign_verdict(client, name, shopped, "PROMOTE", holder=CURRENT, test_set="e" * 64)
    sign_verdict(client, name, agreed, "PROMOTE", holder=CURRENT,
                 test_set=content_digest(load_dataset(named)))
    assert "another test set" in refused(
        lambda: client.set_registered_model_alias(name, "production", shopped))
    client.set_registered_model_alias(name, "production", agreed)
    assert client.get_registered_model(name).aliases == {"production": agreed}
