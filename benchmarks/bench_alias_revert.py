"""How long a refused `production` move stays visible where only webhooks reach tunelens.

Starts a real plain `mlflow server` (sqlite, no tunelens registry store) and a real
`tunelens hooks` process receiving its webhooks. v1 holds `production` (PROMOTE, promoted through
tunelens); v2 has a REJECT verdict. Each try points `production` at v2 through the plain
MlflowClient and polls the registry until the alias is back on v1: the window is from
set_registered_model_alias returning to the revert being visible to a client (webhook delivery,
the gate's check, the revert, and up to one poll interval of 10 ms). Reports p50/p95 over the
tries. Run alone on a quiet machine:

    .venv/bin/python benchmarks/bench_alias_revert.py [--tries 20]
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
# One verdict key for this run, inherited by the hook process (nothing reads the user's key file).
os.environ.setdefault("TUNELENS_VERDICT_KEY", secrets.token_hex(32))

from support.hooks_support import HooksProcess, write_config  # noqa: E402
from support.mlflow_server import MlflowServer  # noqa: E402
from support.verdicts import CURRENT, new_versions, sign_verdict  # noqa: E402

POLL_SECONDS = 0.01


def percentile(values: list[float], share: float) -> float:
    """The `share` quantile, linear between the closest ranks (statistics.quantiles' inclusive)."""
    return statistics.quantiles(values, n=100, method="inclusive")[round(share * 100) - 1]


def visible_window(client, name: str, bad: str, good: str, timeout: float = 60) -> float:
    """Seconds from the bad move's call returning to `production` being back on `good`."""
    client.set_registered_model_alias(name, "production", bad)
    returned = time.perf_counter()
    while client.get_registered_model(name).aliases.get("production") != good:
        if time.perf_counter() - returned > timeout:
            raise RuntimeError(f"production not put back on v{good} within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
    return time.perf_counter() - returned


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=20)
    args = parser.parse_args()
    from mlflow import MlflowClient

    from tunelens.registry.promotion import Gatekeeper, promote

    with tempfile.TemporaryDirectory(prefix="bench-alias-revert-") as tmp:
        tmp = Path(tmp)
        with MlflowServer(tmp / "mlflow", allow_loopback_webhooks=True) as server:
            hooks = HooksProcess(server.url, write_config(tmp / "hooks.yaml"), tmp / "hooks.log",
                                 secret=secrets.token_urlsafe(16))
            try:
                client = MlflowClient(server.url)
                name = "bench-guarded"
                client.create_registered_model(name)
                good, bad = new_versions(client, name, tmp / "files", 2)
                sign_verdict(client, name, good, "PROMOTE", holder=CURRENT)
                promote(client, Gatekeeper.from_config(None), name, good)
                sign_verdict(client, name, bad, "REJECT", holder=CURRENT)
                windows = []
                for attempt in range(args.tries):
                    windows.append(visible_window(client, name, bad, good))
                    print(f"try {attempt + 1}: production on the rejected version for "
                          f"{windows[-1] * 1000:.0f} ms")
            finally:
                hooks.stop()
    print(f"refused move visible for (call returned -> revert visible), {len(windows)} tries: "
          f"p50 {statistics.median(windows) * 1000:.0f} ms, "
          f"p95 {percentile(windows, 0.95) * 1000:.0f} ms, max {max(windows) * 1000:.0f} ms")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
