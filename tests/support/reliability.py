"""The reliability harness: bursts, crashes, restarts and floods against real processes, then an audit.

Shared by tests/service/test_reliability.py (bounded sizes, in `make test`) and
benchmarks/bench_reliability.py (the full sizes whose figures RELIABILITY.md quotes). Everything is
real: an `mlflow server` process on PostgreSQL (or sqlite), `tunelens hooks` processes killed with
SIGKILL, MLflow's own webhook deliveries, signed and forged HTTP requests.
"""
from __future__ import annotations

import random
import re
import socket
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil
from mlflow import MlflowClient

from support.hooks_support import HooksProcess, delivery, post, write_config
from tunelens.registry_hooks.service.state import ERROR, FINAL, STATUS

SECRET = "reliability-secret"


# --------------------------------------------------------------------------- processes

class Fleet:
    """N `tunelens hooks` processes against one MLflow server, each restartable after a kill."""

    def __init__(self, tracking_uri: str, root: Path, size: int, **settings):
        self.tracking_uri = tracking_uri
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = write_config(self.root / "hooks.yaml", **settings)
        self.processes: list[HooksProcess | None] = [None] * size
        self._log_start = [0] * size  # where each process's current life begins in its log
        self.kills: list[list[str]] = []  # per kill: the jobs the killed process had in hand
        self.orphans: list[int] = []  # per kill: its analysis processes still alive 5 s later

    def _log(self, i: int) -> Path:
        return self.root / f"hooks-{i}.log"

    def start(self, i: int | None = None) -> "Fleet":
        for j in range(len(self.processes)) if i is None else [i]:
            self._log_start[j] = self._log(j).stat().st_size if self._log(j).exists() else 0
            self.processes[j] = HooksProcess(self.tracking_uri, self.config, self._log(j),
                                             secret=SECRET)
        return self

    def in_hand(self, i: int) -> list[str]:
        """The jobs process i (in its current life) has started and not finished."""
        with open(self._log(i), errors="replace") as log:
            log.seek(self._log_start[i])
            return jobs_in_hand(log.read())

    def kill(self, i: int) -> None:
        """SIGKILL process i, noting the jobs it had in hand and whether its analysis child
        process outlived it."""
        children = psutil.Process(self.processes[i].process.pid).children(recursive=True)
        self.processes[i].kill()
        self.kills.append(self.in_hand(i))
        self.processes[i] = None
        _, alive = psutil.wait_procs(children, timeout=5)
        self.orphans.append(len(alive))
        for child in alive:
            child.kill()

    def stop(self) -> list[int]:
        codes = [p.stop() for p in self.processes if p is not None]
        self.processes = [None] * len(self.processes)
        return codes

    def alive(self) -> bool:
        return all(p is not None and p.process.poll() is None for p in self.processes)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- hooks-{i}\n{self._log(i).read_text(errors='replace')[-chars:]}"
                         for i in range(len(self.processes)) if self._log(i).exists())

    def log_text(self) -> str:
        return "\n".join(self._log(i).read_text(errors="replace")
                         for i in range(len(self.processes)) if self._log(i).exists())


def jobs_in_hand(log: str) -> list[str]:
    """"name vN" of the jobs a hook process's log shows started and not yet ended."""
    started = re.findall(r"analysing (\S+ v\d+) \(attempt", log)
    ended = set(re.findall(r"(\S+ v\d+) done in ", log))
    ended |= set(re.findall(r"analysis of (\S+ v\d+) (?:failed|interrupted)", log))
    return [job for job in dict.fromkeys(started) if job not in ended]


# --------------------------------------------------------------------------- registration

def source_run(client: MlflowClient, adapter_dir: Path) -> str:
    """Log the adapter once; every version of a burst is registered from this run's artifacts."""
    experiment = client.get_experiment_by_name("sources")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("sources")
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(adapter_dir), "adapter")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def register_versions(tracking_uri: str, name: str, run_id: str, count: int, *,
                      threads: int = 8, interval: float = 0.0) -> list[str]:
    """`count` versions of `name` from run_id's adapter, `threads` clients at once (a burst), or
    one every `interval` seconds; MLflow's retries ride out a server restart."""
    client = MlflowClient(tracking_uri)
    if client.search_registered_models(f"name = '{name}'") == []:
        client.create_registered_model(name)

    def one(_):
        if interval:
            time.sleep(interval)
        return str(MlflowClient(tracking_uri).create_model_version(
            name, f"runs:/{run_id}/adapter", run_id).version)

    with ThreadPoolExecutor(1 if interval else threads) as pool:
        return list(pool.map(one, range(count)))


# --------------------------------------------------------------------------- the audit

@dataclass
class Audit:
    """What the registry says after a run: every version's final state and its analysis runs."""

    versions: int
    done: int
    failed: dict[str, str]  # version -> the error tag
    unfinished: dict[str, str | None]  # version -> status (None: never seen by tunelens)
    runs_per_version: dict[str, int]
    run_tag_mismatch: list[str]  # done versions whose run_id tag is not their one run
    leftover_claims: list[str]  # claim experiments a killed claimant left active
    latencies: list[float] = field(default_factory=list)  # registration -> run ended, s

    @property
    def duplicate_runs(self) -> dict[str, int]:
        return {v: n for v, n in self.runs_per_version.items() if n > 1}

    @property
    def failed_without_reason(self) -> list[str]:
        return [v for v, reason in self.failed.items() if not reason]

    def problems(self) -> list[str]:
        """Empty when nothing was lost, nothing ran twice and every failure says why."""
        issues = []
        if self.unfinished:
            issues.append(f"not final: {self.unfinished}")
        if self.duplicate_runs:
            issues.append(f"more than one analysis run: {self.duplicate_runs}")
        missing = [v for v, n in self.runs_per_version.items() if n == 0
                   and v not in self.failed]
        if missing:
            issues.append(f"done without a run: {missing}")
        if self.run_tag_mismatch:
            issues.append(f"run_id tag does not name the run: {self.run_tag_mismatch}")
        if self.failed_without_reason:
            issues.append(f"failed without a reason: {self.failed_without_reason}")
        if self.leftover_claims:
            issues.append(f"claim experiments left active: {self.leftover_claims}")
        return issues

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        return {"versions": self.versions, "done": self.done, "failed": len(self.failed),
                "failed_reasons": sorted(set(self.failed.values())),
                "unfinished": len(self.unfinished),
                "max_runs_per_version": max(self.runs_per_version.values(), default=0),
                "latency_p50_s": round(statistics.median(lat), 2) if lat else None,
                "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 2) if lat else None,
                "latency_max_s": round(lat[-1], 2) if lat else None}


def _search_all(client: MlflowClient, call, **kwargs) -> list:
    found, token = [], None
    while True:
        page = call(max_results=1000, page_token=token, **kwargs)
        found += list(page)
        token = page.token
        if not token:
            return found


def audit(client: MlflowClient, name: str, expected: list[str]) -> Audit:
    """Reads every version of `name` and the tunelens-analysis runs naming it."""
    versions = {str(mv.version): mv for mv in
                _search_all(client, client.search_model_versions, filter_string=f"name = '{name}'")}
    experiment = client.get_experiment_by_name("tunelens-analysis")
    runs = [] if experiment is None else _search_all(
        client, client.search_runs, experiment_ids=[experiment.experiment_id],
        filter_string=f"tags.`tunelens.model_name` = '{name}'")
    by_version: dict[str, list] = {v: [] for v in expected}
    for run in runs:
        by_version.setdefault(run.data.tags.get("tunelens.model_version"), []).append(run)
    failed, unfinished, mismatch, latencies, done = {}, {}, [], [], 0
    for v in expected:
        mv = versions.get(v)
        status = mv.tags.get(STATUS) if mv else None
        if status not in FINAL:
            unfinished[v] = status
        elif status == "failed":
            failed[v] = mv.tags.get(ERROR, "")
        elif status == "done":
            done += 1
            own = by_version[v]
            if len(own) == 1:
                if own[0].info.run_id != mv.tags.get("tunelens.analysis.run_id"):
                    mismatch.append(v)
                latencies.append((own[0].info.end_time - mv.creation_timestamp) / 1000)
    leftover = [e.name for e in _search_all(client, client.search_experiments,
                                            filter_string=f"name LIKE 'tunelens-claims/{name}/%'")]
    return Audit(len(expected), done, failed, unfinished,
                 {v: len(by_version[v]) for v in expected}, mismatch, leftover, latencies)


def wait_final(client: MlflowClient, name: str, expected: list[str], timeout: float,
               fleet: Fleet | None = None) -> float:
    """Seconds until every expected version has a final status; AssertionError on timeout."""
    started = time.monotonic()
    pending = set(expected)
    while pending:
        if time.monotonic() - started > timeout:
            tail = fleet.log_tail() if fleet else ""
            raise AssertionError(f"{len(pending)} version(s) of {name} not final after {timeout} s: "
                                 f"{sorted(pending, key=int)[:20]}\n{tail}")
        versions = _search_all(client, client.search_model_versions,
                               filter_string=f"name = '{name}'")
        pending -= {str(mv.version) for mv in versions if mv.tags.get(STATUS) in FINAL}
        time.sleep(0.5)
    return time.monotonic() - started


# --------------------------------------------------------------------------- chaos

class Chaos(threading.Thread):
    """Kills a random hook process `kills` times, each after a random 0.5-`max_delay` s of life,
    and restarts it at once; `on_kill(n)` runs after the n-th kill (e.g. restart the server). The
    first kill waits for a process with a job in hand, so the resume path is always exercised."""

    def __init__(self, fleet: Fleet, kills: int, *, max_delay: float = 6.0, seed: int = 7,
                 on_kill=None):
        super().__init__(daemon=True, name="chaos")
        self.fleet, self.kills, self.max_delay = fleet, kills, max_delay
        self.random = random.Random(seed)
        self.on_kill = on_kill or (lambda n: None)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for n in range(1, self.kills + 1):
                time.sleep(self.random.uniform(0.5, self.max_delay))
                i = self._busy_process() if n == 1 else self.random.randrange(
                    len(self.fleet.processes))
                self.fleet.kill(i)
                self.on_kill(n)
                self.fleet.start(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's join()
            self.error = exc

    def _busy_process(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(len(self.fleet.processes)):
                if self.fleet.in_hand(i):
                    return i
            time.sleep(0.05)
        raise AssertionError(f"no hook process started a job within {timeout} s")


# --------------------------------------------------------------------------- flood

@dataclass
class FloodReport:
    forged: int
    forged_rejected: int  # answered 4xx
    forged_statuses: dict[int, int]
    valid: int
    valid_accepted: int  # answered 200
    baseline_latency_ms: list[float]
    flood_latency_ms: list[float]
    flood_seconds: float

    def summary(self) -> dict:
        def pct(values, q):
            values = sorted(values)
            return round(values[int(q * (len(values) - 1))], 1) if values else None

        return {"forged": self.forged, "forged_rejected": self.forged_rejected,
                "forged_statuses": self.forged_statuses, "valid": self.valid,
                "valid_accepted": self.valid_accepted,
                "valid_p50_ms_idle": pct(self.baseline_latency_ms, 0.5),
                "valid_p95_ms_idle": pct(self.baseline_latency_ms, 0.95),
                "valid_p50_ms_flood": pct(self.flood_latency_ms, 0.5),
                "valid_p95_ms_flood": pct(self.flood_latency_ms, 0.95),
                "valid_max_ms_flood": pct(self.flood_latency_ms, 1.0),
                "forged_per_s": round(self.forged / self.flood_seconds, 1)}


def send_forged(i: int, url: str) -> int:
    """Sends the i-th forged request and returns the HTTP status (0: closed unanswered). A rotation
    of wrong secrets, unsigned, stale, tampered, oversized, lying Content-Length, stalled mid-body,
    wrong path and garbage bodies."""
    name, version = "victim", str(i)
    kind = i % 9
    if kind == 0:
        return post(url, *delivery("guessed-secret", name, version))
    if kind == 1:
        return post(url, *delivery(None, name, version))
    if kind == 2:  # signed with the right secret but captured an hour ago: a replay
        return post(url, *delivery(SECRET, name, version, timestamp=int(time.time()) - 3600))
    if kind == 3:
        headers, body = delivery(SECRET, name, version)
        return post(url, headers, body.replace(b'"victim"', b'"target"'))
    if kind == 4:
        return post(url, delivery("x", name, version)[0], b"x" * (2 << 20))
    if kind == 5:
        return raw_post(url, "-5", b"{}")
    if kind == 6:  # announces 100 bytes, sends 10 and stalls: dropped after the read timeout
        return raw_post(url, "100", b"{" * 10)
    if kind == 7:
        return post(url.replace("/webhook", "/admin"), *delivery("x", name, version))
    return post(url, delivery("x", name, version)[0], uuid.uuid4().bytes * 64)


def raw_post(url: str, content_length: str, body: bytes) -> int:
    """A POST whose Content-Length is whatever we say (requests would fix it)."""
    where = urlsplit(url)
    head = (f"POST {where.path} HTTP/1.1\r\nHost: {where.netloc}\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode("latin-1")  # HTTP header bytes
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(head + body)
        answer = sock.recv(1024)
    return int(answer.split()[1]) if answer.startswith(b"HTTP/") else 0


def _timed_valid(url: str, name: str, version: str) -> tuple[int, float]:
    started = time.perf_counter()
    status = post(url, *delivery(SECRET, name, version))
    return status, (time.perf_counter() - started) * 1000


def flood(url: str, forged: int, valid: list[tuple[str, str]], *, threads: int = 32) -> FloodReport:
    """Half the valid deliveries alone (baseline), then `forged` forged requests from `threads`
    clients while the other half are sent one by one; every answer is recorded."""
    half = len(valid) // 2
    baseline = [_timed_valid(url, *key) for key in valid[:half]]
    statuses: dict[int, int] = {}
    during: list[tuple[int, float]] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(send_forged, i, url) for i in range(forged)]
        for key in valid[half:]:
            during.append(_timed_valid(url, *key))
            time.sleep(0.02)
        for future in futures:
            code = future.result()
            statuses[code] = statuses.get(code, 0) + 1
    elapsed = time.perf_counter() - started
    answers = baseline + during
    return FloodReport(
        forged=forged, forged_rejected=sum(n for code, n in statuses.items()
                                           if code == 0 or 400 <= code < 500),
        forged_statuses=statuses, valid=len(valid),
        valid_accepted=sum(1 for code, _ in answers if code == 200),
        baseline_latency_ms=[ms for _, ms in baseline], flood_latency_ms=[ms for _, ms in during],
        flood_seconds=elapsed)
