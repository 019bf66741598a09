"""Verdicts on registered versions written exactly as the evaluator writes them (signed with the
tests' verdict key), without running models: for tests of what reads verdicts (promote, the gate)."""
from __future__ import annotations

from tunelens.registry.promotion import Gatekeeper
from tunelens.registry.verdicts import VerdictStatement, write_verdict
from tunelens.registry.version import VersionRef

CURRENT = object()  # the verdict covered whoever holds the alias now


def sign_verdict(client, name: str, version, decision: str, *, holder=None,
                 alias: str = "production", reasons: str = "", test_set: str = "0" * 64,
                 run_id: str = "0" * 32) -> str:
    """Write `decision` on the version as tunelens's signed verdict; `holder`: None (the verdict
    looked at no alias), CURRENT, or a version number / "none" for the holder it covered."""
    if holder is CURRENT:
        held = client.get_registered_model(name).aliases.get(alias)
        holder = f"{alias}={held or 'none'}"
    elif holder is not None:
        holder = f"{alias}={holder}"
    statement = VerdictStatement.make(Gatekeeper.from_config(None).key,
                                      VersionRef(name, str(version)), decision, holder, test_set,
                                      run_id, reasons)
    write_verdict(client, statement, reasons)
    return str(version)


def new_versions(client, name: str, folder, count: int) -> list[str]:
    """`count` new versions of the registered model `name`, holding one file that is no adapter
    (the gate reads verdicts, not files; the analysis skips them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("not an adapter: the gate reads verdicts, not files")
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    return [str(client.create_model_version(name, f"{run.info.artifact_uri}/model",
                                            run_id=run.info.run_id).version)
            for _ in range(count)]
