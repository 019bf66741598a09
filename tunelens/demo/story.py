"""The demo's story, end to end on the embedded server: register, analyse, compare, promote.

1. Build (or reuse) the demo base, a concise adapter and an echo adapter (tunelens.demo.assets).
2. Start `tunelens server` in-process: a real MLflow server, the hook service and its worker.
3. Register both adapters as versions 1 (concise) and 2 (echo: trained on inputs as targets); the
   hooks analyse each on registration.
4. Compare both on a held-out set and two text groups to choose which to deploy: the concise one
   beats the base, the echo one answers as briefly but corrects nothing and gets REJECT; the
   concise one is recommended and promoted to `production`.
5. Show the lock: move `production` to the echo version through the plain MlflowClient (what the
   MLflow UI's alias editor calls); the registry store refuses it, and the refusal is printed.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tunelens.errors import TunelensError
from tunelens.config import with_changes
from tunelens.settings import Settings


@dataclass(frozen=True)
class Registered:
    """One registered demo version and its automatic analysis."""

    version: str
    analysis_status: str
    analysis_run_id: str | None


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


def register(client, assets, adapter: Path, name: str) -> Registered:
    """Log + register `adapter` and wait for the automatic analysis."""
    from tunelens.registry_hooks.service.log_adapter import log_adapter

    logged = log_adapter(adapter, assets.base_dir, registered_model_name=name)
    version = str(logged.version)
    say(f"registered {name} v{version} ({adapter.name}); waiting for the automatic analysis")
    started = time.monotonic()
    status, analysis_run = wait_for_analysis(client, name, version, timeout_s=600)
    say(f"analysis {status} in {time.monotonic() - started:.1f} s")
    return Registered(version, status, analysis_run)


def print_choice(url: str, name: str, outcome, registered: list[Registered],
                 experiment_ids: dict[str, str]) -> None:
    """The comparison of the demo's versions: each model's figures and verdict, the
    recommendation, and the pages worth opening."""
    metrics = outcome.scores.metrics
    recommendation = outcome.recommendation
    print(f"\nWhich {name} version to deploy: recommended {recommendation.recommended or 'none'}, "
          f"backup {recommendation.backup or 'none'}")
    for model in outcome.plan.models:
        verdict = (outcome.verdict_of(model.label).decision.value if model.role == "candidate"
                   else "")
        print(f"  {model.label:<6} exact match {metrics[f'{model.label}/exact_match']:6.1%}   "
              f"mean words {metrics[f'{model.label}/mean_words']:5.1f}   "
              f"perplexity grammar {metrics[f'{model.label}/ppl_grammar']:7.1f}   {verdict}")
    for reason in recommendation.reasons:
        print(f"  {reason}")
    for candidate in outcome.plan.candidates:
        for part in outcome.verdict_of(candidate.label).parts:
            for rule in part.deciding():
                print(f"  {candidate.label} vs {part.reference}: "
                      f"{rule.name} {rule.status}")
    evaluation = f"{url}/#/experiments/{experiment_ids['evaluation']}/runs/{outcome.run_id}"
    print(f"  comparison page: {evaluation}/artifactPath/tunelens/matrix.html")
    for version in registered:
        print(f"  v{version.version} page:       {url}/#/models/{name}/versions/{version.version}")
        if version.analysis_run_id:
            print(f"  v{version.version} weights:    {url}/#/experiments/"
                  f"{experiment_ids['analysis']}/runs/{version.analysis_run_id}/artifactPath/"
                  f"tunelens/report.html")


def show_the_lock(client, url: str, name: str, other: str) -> list[str]:
    """Point `name@production` at `other` through the plain MlflowClient, as anyone with MLflow
    write access could; the console lines saying what the gate answered."""
    from mlflow.exceptions import MlflowException

    page = f"{url}/#/models/{name}/versions/{other}"
    try:
        client.set_registered_model_alias(name, "production", other)
    except MlflowException as refused:
        said = refused.message.splitlines()[0].removeprefix(f"{refused.error_code}: ")
        return [f"MlflowClient().set_registered_model_alias({name!r}, 'production', {other!r}) "
                f"refused ({refused.error_code}): {said}",
                f"  the MLflow UI shows the same message when you add the alias on {page}"]
    return [f"MlflowClient().set_registered_model_alias({name!r}, 'production', {other!r}) was "
            "written: the tunelens registry store is off (server.registry_store_plugin), so the "
            f"hook service can only put it back afterwards; see {page}"]


def run_demo(config: Settings, data_dir: Path, port: int | None, serve: bool) -> int:
    """The whole story; keeps serving the UI until Ctrl-C when `serve`."""
    import mlflow
    from mlflow import MlflowClient

    from tunelens.demo.assets import build_assets
    from tunelens.evaluators.matrix import compare_versions
    from tunelens.registry.promotion import Gatekeeper, promote
    from tunelens.registry_hooks.service.embedded import EmbeddedServer

    data_dir = Path(data_dir).expanduser().resolve()
    # the load chart with two levels at most 4 in flight: 16 callers at once would make the demo
    # minutes longer on a laptop without showing more
    levels = [n for n in config.evaluation.latency.concurrency
              if n <= 4 or n == config.verdict.latency_at] or [1]
    config = with_changes(config, {"evaluation": {
        "task_profile": config.evaluation.task_profile or "grammar",
        "latency": {"concurrency": levels}}})
    name = config.demo.model_name
    say(f"building the demo models in {data_dir} (first run only: about half a minute on 2 cores)")
    assets = build_assets(data_dir, config.demo)
    server = EmbeddedServer(config, port=port, data_dir=data_dir / "server").start()
    try:
        say(f"MLflow server with tunelens hooks on {server.url}")
        mlflow.set_tracking_uri(server.url)
        client = MlflowClient(server.url)
        registered = [register(client, assets, adapter, name)
                      for adapter in (assets.concise_adapter, assets.echo_adapter)]
        say(f"comparing {', '.join(f'v{r.version}' for r in registered)} against the base on "
            "the held-out set and two text groups, to choose which to deploy")
        choice = compare_versions([f"models:/{name}/{r.version}" for r in registered],
                                  str(assets.test_set), base=assets.base_dir, config=config,
                                  client=client, texts=assets.text_groups())
        recommended = next((m for m in choice.plan.models
                            if m.label == choice.recommendation.recommended), None)
        if recommended is not None:
            say(promote(client, Gatekeeper.from_config(config), name,
                        recommended.uri.rsplit("/", 1)[1], "production").describe())
        experiments = {
            "analysis": client.get_experiment_by_name(
                config.hooks.experiment).experiment_id,
            "evaluation": client.get_run(choice.run_id).info.experiment_id}
        print_choice(server.url, name, choice, registered, experiments)
        production = client.get_registered_model(name).aliases.get("production")
        print(f"\n{name}@production -> v{production}" if production else
              f"\n{name} has no production alias: no version earned a PROMOTE verdict")
        # the last version registered that does not hold production: the echo one, REJECTed
        other = next((r.version for r in reversed(registered) if r.version != str(production)),
                     None)
        if other is not None:
            print("\n" + "\n".join(show_the_lock(client, server.url, name, other)))
        if serve:
            print(f"\nMLflow UI: {server.url}  (Ctrl-C to stop)", flush=True)
            server.serve_until_stopped()
    finally:
        server.stop()
    return 0
