"""Promotion and rollback against a real `mlflow server`, through the `tunelens` command."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from mlflow import MlflowClient

from support.verdicts import CURRENT, sign_verdict
from tunelens.config import load_config, with_changes
from tunelens.errors import TunelensError
from tunelens.registry import promotion
from tunelens.registry.promotion import Gatekeeper, PromotionRefused, history_tag, promotion_tag

GATE = Gatekeeper.from_config(None)


def promote(client, name, version, alias=None, **kwargs):
    return promotion.promote(client, GATE, name, version, alias, **kwargs)


def rollback(client, name, alias=None):
    return promotion.rollback(client, GATE, name, alias)


def auto_promote(client, name, version, config):
    return promotion.auto_promote(client, Gatekeeper.from_config(config), name, version)


@pytest.fixture()
def client(mlflow_server) -> MlflowClient:
    return MlflowClient(mlflow_server.url)


@pytest.fixture()
def registered(client, tmp_path):
    """register(verdict) -> version number: a real run artifact registered as a new version."""
    name = f"grammar-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    experiment = client.create_experiment(f"exp-{name}")

    def register(verdict: str | None, reasons: str | None = None) -> str:
        run = client.create_run(experiment)
        adapter = tmp_path / "model"
        adapter.mkdir(exist_ok=True)
        (adapter / "adapter_config.json").write_text('{"r": 8}')
        client.log_artifacts(run.info.run_id, str(adapter), "model")
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(name, f"{run.info.artifact_uri}/model",
                                              run_id=run.info.run_id).version
        if verdict:
            sign_verdict(client, name, version, verdict, reasons=reasons or "")
        return version

    register.name = name
    return register


def tunelens(server, *args):
    return subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", *args,
                           "--tracking-uri", server.url], capture_output=True, text=True, timeout=120)


def covered(client, name, version, alias="production"):
    """Re-sign the version's verdict as an evaluation made now would: covering the current holder."""
    decision = client.get_model_version(name, version).tags["tunelens.verdict"]
    return sign_verdict(client, name, version, decision, holder=CURRENT, alias=alias)


def state(client, name, version=None, alias="production"):
    """Everything promotion may touch: the aliases, the model's tags, a version's tags."""
    model = client.get_registered_model(name)
    tags = client.get_model_version(name, version).tags if version else {}
    return dict(model.aliases), dict(model.tags), tags


def test_cli_refuses_a_version_whose_verdict_is_not_promote(mlflow_server, client, registered):
    name = registered.name
    good = registered("PROMOTE")
    promote(client, name, good)
    rejected = registered("REJECT", "REJECT v2 vs base on 64 rows | latency_ratio FAIL: ...")
    before = state(client, name, rejected)
    out = tunelens(mlflow_server, "promote", name, rejected)
    assert out.returncode == 1, out.stderr
    assert "its verdict is REJECT, not PROMOTE" in out.stderr and "latency_ratio FAIL" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert state(client, name, rejected) == before
    assert before[0] == {"production": good}

    never = registered(None)
    with pytest.raises(PromotionRefused, match="it was never evaluated") as refused:
        promote(client, name, never)
    assert refused.value.exit_code == 1
    inconclusive = registered("INCONCLUSIVE")
    with pytest.raises(PromotionRefused, match="its verdict is INCONCLUSIVE"):
        promote(client, name, inconclusive)
    assert client.get_registered_model(name).aliases == {"production": good}


def test_cli_promotes_records_the_previous_holder_and_rollback_restores_it(
        mlflow_server, client, registered):
    name = registered.name
    first, second = registered("PROMOTE"), registered("PROMOTE")
    assert f"{name}@production -> version {first} (new alias)" in promote(client, name,
                                                                          first).describe()
    aliases, model_tags, tags = state(client, name, first)
    assert aliases == {"production": first} and history_tag("production") not in model_tags
    assert tags[promotion_tag("production", "replaced")] == "none"

    covered(client, name, second)
    out = tunelens(mlflow_server, "promote", name, second)
    assert out.returncode == 0, out.stderr
    aliases, model_tags, tags = state(client, name, second)
    assert aliases == {"production": second}
    assert model_tags[history_tag("production")] == first
    assert tags[promotion_tag("production", "replaced")] == first
    assert tags[promotion_tag("production", "forced")] == "false"

    out = tunelens(mlflow_server, "rollback", name)
    assert out.returncode == 0, out.stderr
    assert f"rolled back to version {first} (was version {second})" in out.stdout
    aliases, model_tags, _ = state(client, name)
    assert aliases == {"production": first} and history_tag("production") not in model_tags

    out = tunelens(mlflow_server, "rollback", name)  # nothing earlier recorded
    assert out.returncode == 1 and "nothing to roll back to" in out.stderr
    assert client.get_registered_model(name).aliases == {"production": first}


def test_force_needs_a_reason_and_records_it(mlflow_server, client, registered):
    name = registered.name
    champion, rejected = registered("PROMOTE"), registered("REJECT")
    promote(client, name, champion)
    before = state(client, name, rejected)
    out = tunelens(mlflow_server, "promote", name, rejected, "--force")
    assert out.returncode == 2 and "--force needs --reason" in out.stderr
    with pytest.raises(TunelensError, match="--force needs --reason"):
        promote(client, name, rejected, force=True, reason="   ")
    assert state(client, name, rejected) == before

    out = tunelens(mlflow_server, "promote", name, rejected, "--force", "--reason",
                   "hotfix for ticket 42: base model outage")
    assert out.returncode == 0, out.stderr
    assert "forced over verdict REJECT" in out.stdout
    aliases, model_tags, tags = state(client, name, rejected)
    assert aliases == {"production": rejected}
    assert tags[promotion_tag("production", "forced")] == "true"
    assert tags[promotion_tag("production", "reason")] == "hotfix for ticket 42: base model outage"
    assert model_tags[history_tag("production")] == champion
    assert rollback(client, name).restored == champion


def test_rollback_walks_back_skipping_deleted_versions(client, registered):
    name = registered.name
    v1, v2, v3, v4 = (registered("PROMOTE") for _ in range(4))
    for version in (v1, v2, v3, v4):
        promote(client, name, covered(client, name, version))
    assert client.get_registered_model(name).tags[history_tag("production")] == f"{v1},{v2},{v3}"
    assert rollback(client, name).restored == v3
    client.delete_model_version(name, v2)
    result = rollback(client, name)
    assert (result.restored, result.replaced, result.skipped) == (v1, v3, [v2])
    assert client.get_registered_model(name).aliases == {"production": v1}
    with pytest.raises(PromotionRefused, match="nothing to roll back to, it stays on version"):
        rollback(client, name)


def test_aliases_are_independent_and_repeating_a_promotion_changes_nothing(client, registered):
    name = registered.name
    v1, v2 = registered("PROMOTE"), registered("PROMOTE")
    promote(client, name, v1)
    promote(client, name, v2, alias="staging")
    again = promote(client, name, v1)
    assert not again.changed and "nothing changed" in again.describe()
    model = client.get_registered_model(name)
    assert model.aliases == {"production": v1, "staging": v2}
    # no earlier holder recorded for either alias (only the holders themselves, signed)
    assert not any(key.startswith("tunelens.alias.") and key.endswith(".previous")
                   for key in model.tags)
    with pytest.raises(PromotionRefused, match="staging has no earlier holder"):
        rollback(client, name, "staging")


def test_unknown_model_or_version_is_one_clear_error(mlflow_server, client, registered):
    out = tunelens(mlflow_server, "promote", "no-such-model", "1")
    assert out.returncode == 2 and "registered model 'no-such-model' not found" in out.stderr
    with pytest.raises(TunelensError, match="has no version 99"):
        promote(client, registered.name, 99)


def test_an_alias_mlflow_refuses_is_one_line_and_changes_nothing(mlflow_server, client, registered):
    name = registered.name
    version = registered("PROMOTE")
    promote(client, name, version, alias="champion")
    before = state(client, name, version)
    out = tunelens(mlflow_server, "promote", name, version, "--alias", "latest")  # reserved
    assert out.returncode == 2 and out.stderr.startswith("tunelens promote: error: MLflow refused")
    assert "Traceback" not in out.stderr
    assert state(client, name, version) == before


def test_auto_promote_follows_the_switch_and_the_verdict(client, registered, tmp_path):
    name = registered.name
    champion, rejected, better = registered("PROMOTE"), registered("REJECT"), registered("PROMOTE")
    off = load_config()
    assert off.promotion.auto_promote is False
    assert auto_promote(client, name, champion, off) is None
    assert client.get_registered_model(name).aliases == {}
    policy = tmp_path / "auto.yaml"
    policy.write_text("promotion:\n  auto_promote: true\n  alias: live\n")
    on = load_config(policy)
    assert auto_promote(client, name, champion, on).changed
    assert auto_promote(client, name, rejected, on) is None
    assert client.get_registered_model(name).aliases == {"live": champion}
    assert auto_promote(client, name, better, on) is None  # its verdict did not cover the holder
    assert client.get_registered_model(name).aliases == {"live": champion}
    covered(client, name, better, "live")
    assert auto_promote(client, name, better, on).previous == champion
    assert rollback(client, name, "live").restored == champion


def test_a_verdict_that_did_not_cover_the_current_holder_is_refused(mlflow_server, client,
                                                                    registered):
    """PROMOTE against an old holder, or against nobody when someone holds the alias now, does
    not speak to the current holder: exit 1, nothing changed, the message says to re-evaluate."""
    name = registered.name
    first, second, third = (registered("PROMOTE") for _ in range(3))
    promote(client, name, covered(client, name, first))  # nobody held it: covers "none"
    sign_verdict(client, name, third, "PROMOTE", holder="none")  # evaluated before
    before = state(client, name, third)
    out = tunelens(mlflow_server, "promote", name, third)
    assert out.returncode == 1, out.stderr
    assert "evaluated against no version holding it" in out.stderr
    assert f"v{first} holds production now" in out.stderr
    assert "tunelens evaluate" in out.stderr and "Traceback" not in out.stderr
    assert state(client, name, third) == before

    promote(client, name, covered(client, name, second))  # production: first -> second
    sign_verdict(client, name, third, "PROMOTE", holder=first)  # stale holder
    with pytest.raises(PromotionRefused, match=f"evaluated against v{first} but v{second} holds "
                                               "production now.*tunelens evaluate"):
        promote(client, name, third)
    never_recorded = registered("PROMOTE")  # a verdict without a holder tag covers nobody
    with pytest.raises(PromotionRefused, match="evaluated against no holder"):
        promote(client, name, never_recorded)
    assert client.get_registered_model(name).aliases == {"production": second}
    # another alias: nobody holds staging, so the production-covering verdict may go there
    assert promote(client, name, third, alias="staging").changed
    # --force still overrides, with its reason recorded
    assert promote(client, name, third, force=True, reason="rollout ticket 7").previous == second


def test_the_audit_experiment_may_be_a_workspace_path(client, registered):
    name = registered.name
    rejected = registered("REJECT")
    config = with_changes(load_config(), {"promotion": {"audit_experiment": "/Shared/team-a/tunelens-audit"}})
    promotion.promote(client, Gatekeeper.from_config(config), name, rejected, force=True,
                      reason="hotfix: base model outage")
    audit = client.get_experiment_by_name("/Shared/team-a/tunelens-audit")
    [run] = client.search_runs([audit.experiment_id],
                               f"tags.`tunelens.model` = 'models:/{name}/{rejected}'")
    assert run.info.status == "FINISHED"
