"""The demo's story, end to end on the embedded server: register, analyse, evaluate, promote.

1. Build (or reuse) the demo base, a concise adapter and an echo adapter (tunelens.demo.assets).
2. Start `tunelens server` in-process: a real MLflow server, the hook service and its worker.
3. Register the concise adapter; the hooks analyse it; evaluate it against the base; promote it to
   `production` when the verdict is PROMOTE.
4. Register the echo adapter (trained on inputs as targets); compare both versions to choose which
   to deploy: the echo one is concise but corrects nothing, its verdict against the base and the
   production version says REJECT, and the concise one stays recommended.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tunelens.errors import TunelensError


@dataclass(frozen=True)
class DemoVersion:
    """One registered demo version and what tunelens concluded about it."""

    version: str
    analysis_status: str
    analysis_run_id: str | None
    eval_run_id: str
    verdict: str
    reasons: str
    exact_match: dict[str, float]
    mean_words: dict[str, float]


def say(message: str) -> None:
    print(f"[tunelens demo] {message}", file=sys.stderr, flush=True)


def wait_for_analysis(client, name: str, version: str, timeout_s: float) -> tuple[str, str | None]:
    """Poll the version's tunelens.analysis.status until the hooks finish it."""
    from tunelens.registry_hooks.service import state

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        tags = client.get_model_version(name, version).tags
        status = tags.get(state.STATUS)
        if status in state.FINAL:
            if status == state.FAILED:
                raise TunelensError(f"the analysis of {name} v{version} failed: "
                                    f"{tags.get(state.ERROR)}")
            return status, tags.get(state.RUN_ID)
        time.sleep(0.5)
    raise TunelensError(f"the analysis of {name} v{version} did not finish in {timeout_s:.0f} s "
                        f"(status {status!r}); see the server log in the data dir")


def register(client, assets, adapter: Path, name: str) -> tuple[str, str, str | None]:
    """Log + register `adapter` and wait for the automatic analysis: (version, status, run id)."""
    from tunelens.registry_hooks.service.log_adapter import log_adapter

    logged = log_adapter(adapter, assets.base_dir, registered_model_name=name)
    version = str(logged.version)
    say(f"registered {name} v{version} ({adapter.name}); waiting for the automatic analysis")
    started = time.monotonic()
    status, analysis_run = wait_for_analysis(client, name, version, timeout_s=600)
    say(f"analysis {status} in {time.monotonic() - started:.1f} s")
    return version, status, analysis_run


def register_and_judge(client, assets, adapter: Path, name: str, config: dict) -> DemoVersion:
    """Register `adapter`, then evaluate it side by side with its base (and text groups)."""
    from tunelens.evaluators.run import evaluate_version

    version, status, analysis_run = register(client, assets, adapter, name)
    say(f"evaluating v{version} against the base")
    outcome = evaluate_version(f"models:/{name}/{version}", str(assets.test_set),
                               base=assets.base_dir, config=config, client=client,
                               texts=assets.text_groups())
    labels = outcome.labels
    return DemoVersion(version, status, analysis_run, outcome.run_id,
                       outcome.verdict.decision.value, outcome.verdict.reasons,
                       {label: outcome.metrics[f"{label}/exact_match"] for label in labels},
                       {label: outcome.metrics[f"{label}/mean_words"] for label in labels})


def print_choice(url: str, name: str, outcome, experiment_id: str) -> None:
    """The comparison of the demo's versions: each one's figures and verdict, the recommendation."""
    metrics = outcome.scores.metrics
    print(f"\nWhich {name} version to deploy: recommended "
          f"{outcome.recommendation.recommended or 'none'}, backup "
          f"{outcome.recommendation.backup or 'none'}")
    for model in outcome.plan.models:
        verdict = (outcome.verdict_of(model.label).decision.value if model.role == "candidate"
                   else model.role)
        print(f"  {model.label:<12} exact match {metrics[f'{model.label}/exact_match']:6.1%}   "
              f"mean words {metrics[f'{model.label}/mean_words']:5.1f}   {verdict}")
    for reason in outcome.recommendation.reasons:
        print(f"  {reason}")
    print(f"  comparison page: {url}/#/experiments/{experiment_id}/runs/{outcome.run_id}"
          f"/artifactPath/tunelens/matrix.html")


def print_version(url: str, name: str, result: DemoVersion, experiment_ids: dict[str, str]) -> None:
    print(f"\n{name} v{result.version}: {result.verdict}")
    for label, score in result.exact_match.items():
        print(f"  {label:<12} exact match {score:6.1%}   mean words {result.mean_words[label]:5.1f}")
    print(f"  why: {result.reasons}")
    print(f"  version page:   {url}/#/models/{name}/versions/{result.version}")
    if result.analysis_run_id:
        print(f"  weight report:  {url}/#/experiments/{experiment_ids['analysis']}/runs/"
              f"{result.analysis_run_id}/artifactPath/tunelens/report.html")
    print(f"  evaluation run: {url}/#/experiments/{experiment_ids['evaluation']}/runs/"
          f"{result.eval_run_id}")


def run_demo(config: dict, data_dir: Path, port: int | None, serve: bool) -> int:
    """The whole story; keeps serving the UI until Ctrl-C when `serve`."""
    import mlflow
    from mlflow import MlflowClient

    from tunelens.demo.assets import build_assets
    from tunelens.evaluators.matrix import compare_versions
    from tunelens.evaluators.promotion import promote
    from tunelens.registry_hooks.service.embedded import EmbeddedServer

    data_dir = Path(data_dir).expanduser().resolve()
    config["evaluation"]["task_profile"] = config["evaluation"]["task_profile"] or "grammar"
    name = config["demo"]["model_name"]
    say(f"building the demo models in {data_dir} (first run only: about half a minute on 2 cores)")
    assets = build_assets(data_dir, config["demo"])
    server = EmbeddedServer(config, port=port, data_dir=data_dir / "server").start()
    try:
        say(f"MLflow server with tunelens hooks on {server.url}")
        mlflow.set_tracking_uri(server.url)
        client = MlflowClient(server.url)
        good = register_and_judge(client, assets, assets.concise_adapter, name, config)
        if good.verdict == "PROMOTE":
            say(promote(client, name, good.version, "production").describe())
        weak_version = register(client, assets, assets.echo_adapter, name)[0]
        say(f"comparing v{good.version} and v{weak_version} to choose which to deploy")
        choice = compare_versions([f"models:/{name}/{good.version}",
                                   f"models:/{name}/{weak_version}"], str(assets.test_set),
                                  base=assets.base_dir, config=config, client=client)
        recommended = next((m for m in choice.plan.models
                            if m.label == choice.recommendation.recommended), None)
        if recommended is not None:
            say(promote(client, name, recommended.uri.rsplit("/", 1)[1], "production").describe())
        experiments = {
            "analysis": client.get_experiment_by_name(
                config["hooks"]["experiment"]).experiment_id,
            "evaluation": client.get_run(good.eval_run_id).info.experiment_id}
        print_version(server.url, name, good, experiments)
        print_choice(server.url, name, choice, experiments["evaluation"])
        production = client.get_registered_model(name).aliases.get("production")
        print(f"\n{name}@production -> v{production}" if production else
              f"\n{name} has no production alias: no version earned a PROMOTE verdict")
        if serve:
            print(f"\nMLflow UI: {server.url}  (Ctrl-C to stop)", flush=True)
            server.serve_until_stopped()
    finally:
        server.stop()
    return 0
