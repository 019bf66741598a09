"""Registration -> `done` on the embedded `tunelens server` (goal: under 15 s).

Starts a real `tunelens server` in a temporary data dir, builds a tiny Llama base and a real LoRA
adapter (r=8 on q/k/v/o and the MLP, 2 layers), registers it N times through the normal MLflow
client one after another, and reports per version: registration -> picked up (`running`, i.e.
webhook delivery + queue) and registration -> `done` (download, analysis, report, charts, MLflow
run, tags). Run: .venv/bin/python benchmarks/bench_hooks.py [--versions 5]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.factories import make_lora_adapter, tiny_llama  # noqa: E402
from support.mlflow_server import free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=5)
    args = parser.parse_args()
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as tmp:
        tmp = Path(tmp)
        base = tiny_llama(tmp / "base")
        adapter = make_lora_adapter(base, tmp / "adapter", r=8, lora_alpha=16,
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"])
        port = free_port()
        log = open(tmp / "server.log", "wb")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "tunelens.plugin.cli", "server", "--port",
                                   str(port), "--data-dir", str(tmp / "data")], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            while "MLflow UI and API on" not in (tmp / "server.log").read_text(errors="replace"):
                if server.poll() is not None:
                    print((tmp / "server.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.1)
            print(f"tunelens server up in {time.perf_counter() - started:.1f} s")
            client = MlflowClient(f"http://127.0.0.1:{port}")
            run = client.create_run(client.create_experiment("bench-sources"))
            client.log_artifacts(run.info.run_id, str(adapter), "adapter")
            client.create_registered_model("bench")
            picked, done = [], []
            for _ in range(args.versions):
                t0 = time.perf_counter()
                version = client.create_model_version("bench", f"runs:/{run.info.run_id}/adapter",
                                                      run.info.run_id).version
                seen_running = None
                while True:
                    status = client.get_model_version("bench", version).tags.get(
                        "tunelens.analysis.status")
                    if status == "running" and seen_running is None:
                        seen_running = time.perf_counter() - t0
                    if status in ("done", "failed", "skipped"):
                        break
                    time.sleep(0.05)
                assert status == "done", status
                done.append(time.perf_counter() - t0)
                picked.append(seen_running if seen_running is not None else done[-1])
                print(f"version {version}: picked up {picked[-1]:.2f} s, done {done[-1]:.2f} s")
            print(f"registration -> done over {len(done)} versions: median "
                  f"{statistics.median(done):.2f} s, min {min(done):.2f} s, max {max(done):.2f} s "
                  f"(picked up: median {statistics.median(picked):.2f} s)")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
            log.close()
        # The worker's own per-phase split of each job (download, analysis, report+charts, mlflow).
        for line in (tmp / "server.log").read_text(errors="replace").splitlines():
            if " done in " in line:
                print("worker:", line.split(": ", 1)[-1])
        print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
