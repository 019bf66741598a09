"""The reliability runs at full size: the figures RELIABILITY.md quotes (tests/service/test_reliability.py runs them small).

1. load:   a PostgreSQL-backed `mlflow server --workers 2`, two `tunelens hooks` processes, N versions
           registered in a burst by 8 clients; time to drain, throughput, registration -> done.
2. faults: versions registered one by one while a random hook process is SIGKILLed K times (and
           restarted), the MLflow server restarted after kill K/2, then the hook service stopped while
           more versions are registered and started again.
3. flood:  F forged webhook requests from 32 clients while signed deliveries are timed.
After each phase the audit: every version final, exactly one analysis run per done version, every
failure with a reason, no claim left behind. Exit 1 if any phase finds a problem.

    .venv/bin/python benchmarks/bench_reliability.py [--versions 200] [--kills 20] [--forged 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.factories import make_lora_adapter, tiny_llama  # noqa: E402
from support.hooks_support import deliveries_only_hooks  # noqa: E402
from support.mlflow_server import MlflowServer, postgres_database  # noqa: E402
from support.reliability import (SECRET, Chaos, Fleet, audit, flood, register_versions,  # noqa: E402
                         source_run, wait_final)


def load_phase(server, root: Path, run_id: str, versions: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(server.url)
    fleet = Fleet(server.url, root / "load", 2, lease_seconds=60, poll_interval=5).start()
    try:
        started = time.monotonic()
        registered = register_versions(server.url, "load", run_id, versions, threads=8)
        registering = time.monotonic() - started
        drained = wait_final(client, "load", registered, timeout=7200, fleet=fleet)
        result = audit(client, "load", registered)
    finally:
        fleet.stop()
    return {"phase": "load", "registration_s": round(registering, 1),
            "drain_s_from_first_registration": round(drained + registering, 1),
            "versions_per_minute": round(60 * versions / (drained + registering), 1),
            **result.summary(), "problems": result.problems()}


def fault_phase(server, root: Path, run_id: str, versions: int, kills: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(server.url)
    fleet = Fleet(server.url, root / "faults", 2, lease_seconds=10, poll_interval=3).start()
    restart_at = max(1, kills // 2)
    restart_seconds = []

    def restart_server(kill: int) -> None:
        if kill == restart_at:
            t0 = time.monotonic()
            server.restart()
            restart_seconds.append(round(time.monotonic() - t0, 1))

    down = max(1, versions // 5)
    registered: list[str] = []
    chaos = Chaos(fleet, kills, max_delay=8, on_kill=restart_server)
    registering = threading.Thread(target=lambda: registered.extend(
        register_versions(server.url, "faults", run_id, versions - down, interval=1.0)))
    try:
        registering.start()
        chaos.start()
        registering.join()
        chaos.join()
        if chaos.error:
            raise chaos.error
        fleet.stop()  # the hook service is down while these are registered
        registered += register_versions(server.url, "faults", run_id, down, threads=4)
        time.sleep(5)
        fleet.start()
        drained = wait_final(client, "faults", registered, timeout=7200, fleet=fleet)
        result = audit(client, "faults", registered)
        log = fleet.log_text()
    finally:
        fleet.stop()
    return {"phase": "faults", "sigkills": len(fleet.kills),
            "sigkills_mid_job": sum(1 for jobs in fleet.kills if jobs),
            "server_restarts": len(restart_seconds), "server_restart_s": restart_seconds,
            "registered_while_service_down": down,
            "resumed_attempts": log.count("(attempt 2)") + log.count("(attempt 3)")
            + log.count("(attempt 4)") + log.count("(attempt 5)"),
            "drain_after_restart_s": round(drained, 1), **result.summary(),
            "problems": result.problems()}


def flood_phase(root: Path, adapter: Path, forged: int) -> dict:
    from mlflow import MlflowClient

    with MlflowServer(root / "flood-mlflow") as server:
        client = MlflowClient(server.url)
        hooks = deliveries_only_hooks(server.url, root / "flood", SECRET)
        try:
            versions = register_versions(server.url, "flooded", source_run(client, adapter), 20,
                                         threads=4)
            report = flood(hooks.url, forged, [("flooded", v) for v in versions])
            wait_final(client, "flooded", versions, timeout=1800)
            result = audit(client, "flooded", versions)
            alive = hooks.process.poll() is None
            log_lines = hooks.log_tail(100_000_000).count("webhook: rejected")
        finally:
            hooks.stop()
    return {"phase": "flood", **report.summary(), "service_alive": alive,
            "rejection_log_lines": log_lines, "versions_done": result.done,
            "problems": result.problems()
            + ([] if report.forged_rejected == forged else ["a forged request was accepted"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=200)
    parser.add_argument("--fault-versions", type=int, default=60)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--forged", type=int, default=1000)
    parser.add_argument("--phases", default="load,faults,flood")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    from mlflow import MlflowClient

    figures = {"machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start"}
    phases = args.phases.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        root = Path(tmp)
        base = tiny_llama(root / "base")
        adapter = make_lora_adapter(base, root / "adapter", r=8, lora_alpha=16,
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        results = []
        if {"load", "faults"} & set(phases):
            with postgres_database("tunelens_bench") as uri, \
                    MlflowServer(root / "mlflow", uri, allow_loopback_webhooks=True,
                                 workers=2) as server:
                run_id = source_run(MlflowClient(server.url), adapter)
                if "load" in phases:
                    results.append(load_phase(server, root, run_id, args.versions))
                    print(json.dumps(results[-1]), flush=True)
                if "faults" in phases:
                    results.append(fault_phase(server, root, run_id, args.fault_versions,
                                               args.kills))
                    print(json.dumps(results[-1]), flush=True)
        if "flood" in phases:
            results.append(flood_phase(root, adapter, args.forged))
            print(json.dumps(results[-1]), flush=True)
    figures["phases"] = results
    figures["load_at_end"] = round(os.getloadavg()[0], 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
