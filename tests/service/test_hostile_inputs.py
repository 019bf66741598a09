"""Hostile adapters: the corpus in tests/data/hostile, built by
tests/hostile/build_corpus.py, through the CLI and through a real MLflow server and `tunelens hooks`
process. Each case ends as one readable line naming the file (or `done` where the case is
legitimate, as cases.json says), nothing an upload carries ever runs, the service keeps serving and
its memory stays bounded.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from mlflow.entities import FileInfo

from support import DATA
from support.cli_support import assert_one_line_error
from support.hooks_support import HooksProcess, register, wait_status, write_config
from hostile.build_corpus import MARKER_ENV, SHARED, files_of, write_case
from hostile.build_corpus import main as main_of_generator
from support.mlflow_server import MlflowServer
from tunelens.config import load_config, with_changes
from tunelens.plugin.cli import main
from tunelens.registry.files import AdapterDetectionError, _names, detect_adapter
from tunelens.registry_hooks.service.state import ERROR, STATUS
from tunelens.registry_hooks.service.worker import Worker

CORPUS = DATA / "hostile"
CASES = json.loads((CORPUS / "cases.json").read_text())
PICKLES = ["pickle-bin-os-system", "pickle-bin-exec", "torch-zip-malicious-global"]
# The hook service's peak RSS bound: its own baseline (torch, mlflow, matplotlib, the webhook
# server) measured 514 MiB after start-up and ~630 MiB peak over the whole corpus here; one honoured
# lie in the corpus would ask for 6.4 MB to 4 TB, the zip bomb for 16 MiB per 16 KB, and the valid
# adapters need < 1 MB. 1.5 GB leaves room for the baseline to grow, not for a honoured lie.
PEAK_RSS_BOUND = 1536 * 1024 ** 2


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    """The file every pickle payload would create; it must never exist."""
    path = tmp_path_factory.mktemp("marker") / "payload-ran"
    previous = os.environ.get(MARKER_ENV)
    os.environ[MARKER_ENV] = str(path)
    yield path
    assert not path.exists(), "a pickle payload ran"
    if previous is None:
        del os.environ[MARKER_ENV]
    else:
        os.environ[MARKER_ENV] = previous


def case_dir(case: dict, root: Path) -> Path:
    """The committed case directory, or the large case written under `root` now."""
    if not case.get("at_test_time"):
        return CORPUS / case["name"]
    path = root / case["name"]
    if not path.exists():
        write_case(path, files_of(case["name"]))
    return path


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cli_ends_each_case_in_one_readable_line(case, marker, tmp_path, capsys):
    adapter = case_dir(case, tmp_path)
    argv = ["analyze", str(adapter), "--out", str(tmp_path / "out")]
    if case["expected"] == "done":
        assert main(argv) == 0, capsys.readouterr().err
        assert json.loads((tmp_path / "out" / "analysis.json").read_text())["modules"]
        if case["name"] == "nan-inf-everywhere":
            assert "NaN/Inf values" in capsys.readouterr().err
    else:
        assert_one_line_error(capsys, argv, case["error"], case["name"])
    assert not marker.exists()


def test_committed_corpus_is_what_the_generator_writes(tmp_path):
    """build_corpus.py is deterministic and tests/data/hostile is its output, byte for byte."""
    def listing(root):
        return {str(f.relative_to(root)): os.readlink(f) if f.is_symlink() else f.read_bytes()
                for f in root.rglob("*") if f.is_symlink() or f.is_file()}

    main_of_generator(tmp_path / "hostile")
    assert listing(tmp_path / "hostile") == listing(CORPUS)


def test_corpus_is_at_least_32_cases_and_small():
    assert len(CASES) >= 32 and len({c["name"] for c in CASES}) == len(CASES)
    committed = [f for f in CORPUS.rglob("*") if f.is_file() and not f.is_symlink()]
    assert max(f.stat().st_size for f in committed) < 64 * 1024


@pytest.mark.parametrize("name", PICKLES)
def test_the_pickle_payloads_are_armed(name, tmp_path):
    """Control: unpickled without restriction, each payload does create the marker file."""
    control = tmp_path / "control-marker"
    code = ("import pickle, sys, torch; path = sys.argv[1]; torch.load(path, weights_only=False) "
            "if 'zip' in path else pickle.load(open(path, 'rb'))")
    subprocess.run([sys.executable, "-c", code, str(CORPUS / name / "adapter_model.bin")],
                   env={**os.environ, MARKER_ENV: str(control)}, capture_output=True, timeout=120)
    assert control.exists()


@pytest.mark.parametrize("name", PICKLES)
def test_the_tunelens_process_refuses_pickles_without_running_them(name, marker):
    """The installed entry point as a user runs it: exit 2, one stderr line, no traceback."""
    done = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "analyze",
                           str(CORPUS / name)], capture_output=True, text=True, timeout=120)
    case = next(c for c in CASES if c["name"] == name)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and case["error"] in lines[0], done.stderr
    assert "refused" in lines[0] and "re-save the adapter as safetensors" in lines[0]
    assert not marker.exists()


def test_the_zip_bomb_and_legacy_bin_would_load():
    """Control: torch itself inflates the bomb (16 KB -> 16 MiB) and reads the legacy format
    (storages allocated at the size its pickle declares): tunelens's refusal is what stops them."""
    import torch

    bomb = CORPUS / "torch-zip-bomb" / "adapter_model.bin"
    loaded = torch.load(bomb, weights_only=True)
    assert sum(t.nbytes for t in loaded.values()) == 16 * 1024 ** 2 > 900 * bomb.stat().st_size
    assert torch.load(CORPUS / "torch-legacy-format" / "adapter_model.bin", weights_only=True)


def test_symlinks_inside_the_adapter_directory_are_followed(tmp_path):
    """The symlink refusal is about leaving the directory, not about links."""
    adapter = tmp_path / "linked"
    shutil.copytree(CORPUS / SHARED, adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "real.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to("real.safetensors")
    assert main(["analyze", str(adapter), "--out", str(tmp_path / "out")]) == 0


def test_a_fifo_as_weights_does_not_block(tmp_path, capsys):
    adapter = tmp_path / "fifo"
    shutil.copytree(CORPUS / SHARED, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    os.mkfifo(adapter / "adapter_model.safetensors")
    assert_one_line_error(capsys, ["analyze", str(adapter)], "neither adapter_model.safetensors")


class _ListingOnly:
    """An artifact store listing these paths. MLflow's own stores refuse `..` on upload and on
    listing (validate_path_is_safe), so no real store can serve one: this stands in for a store
    that would (a third-party plugin, a compromised server)."""

    def __init__(self, *paths):
        self.paths = paths

    def list_artifacts(self, path=None):
        return [FileInfo(p, False, 10) for p in self.paths]


@pytest.mark.parametrize("path", ["../x.safetensors", "adapter/../../etc/passwd",
                                  "/etc/passwd", "a\\..\\b"])
def test_artifact_paths_that_could_leave_the_download_directory_are_refused(path):
    with pytest.raises(AdapterDetectionError, match="absolute or contains '..'"):
        _names(_ListingOnly("adapter_config.json", path))
    assert set(_names(_ListingOnly("adapter_config.json", "a..b.safetensors"))) == {
        "adapter_config.json", "a..b.safetensors"}


# --- the same corpus through a real MLflow server and one `tunelens hooks` process ---------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Its own server: the hook scan touches every version on it, so no other test's versions."""
    with MlflowServer(tmp_path_factory.mktemp("hostile-mlflow"),
                      allow_loopback_webhooks=True) as srv:
        yield srv


def expected_via_mlflow(case: dict) -> tuple[str, str | None]:
    override = case.get("mlflow") or {}
    return override.get("expected", case["expected"]), override.get("error", case["error"])


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024


def analysis_children(pid: int) -> list[int]:
    """The hook service's analysis child processes (registry_hooks/sandbox.py)."""
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def test_service_fails_each_hostile_version_readably_and_keeps_serving(
        server, marker, llama_adapter, tmp_path):
    client = MlflowClient(server.url)
    config = write_config(tmp_path / "hooks.yaml")
    hooks = HooksProcess(server.url, config, tmp_path / "hooks.log", secret="hostile-secret")
    baseline = peak_rss(hooks.process.pid)
    started = time.monotonic()
    try:
        versions = {c["name"]: register(client, "hostile", case_dir(c, tmp_path))
                    for c in CASES if c["via_mlflow"]}
        valid = register(client, "hostile", llama_adapter)
        outcomes = {name: wait_status(client, "hostile", v, timeout=300)
                    for name, v in versions.items()}
        assert wait_status(client, "hostile", valid)[STATUS] == "done", hooks.log_tail()
        drained = time.monotonic() - started
        for case in (c for c in CASES if c["via_mlflow"]):
            status, error = expected_via_mlflow(case)
            tags = outcomes[case["name"]]
            assert tags[STATUS] == status, (case["name"], tags)
            text = tags.get(ERROR) or tags.get("tunelens.analysis.reason") or ""
            print(f"{case['name']}: {tags[STATUS]} | {text}")
            if error:
                assert error in text and "\n" not in text and "Traceback" not in text, (
                    case["name"], text)
        assert hooks.process.poll() is None and server.healthy()
        peak = peak_rss(hooks.process.pid)
        children = analysis_children(hooks.process.pid)
        assert children, "the analyses ran in no child process"
        child_peak = max(peak_rss(child) for child in children)
        print(f"\nhostile corpus via MLflow: {len(versions)} + 1 valid versions in "
              f"{drained:.1f} s; hook service peak RSS {peak / 1024 ** 2:.0f} MiB "
              f"({baseline / 1024 ** 2:.0f} MiB after start-up), analysis process "
              f"{child_peak / 1024 ** 2:.0f} MiB")
        assert peak < PEAK_RSS_BOUND and child_peak < PEAK_RSS_BOUND, (peak, child_peak)
        assert not marker.exists()
    finally:
        assert hooks.stop() == 0, hooks.log_tail()


def test_download_cap_refuses_a_version_larger_than_max_download_bytes(server, tmp_path):
    client = MlflowClient(server.url)
    version = register(client, "capped", CORPUS / SHARED)
    with pytest.raises(AdapterDetectionError, match=r"over hooks.max_download_bytes \(1,000\)"):
        detect_adapter(client, "capped", version, tmp_path / "small", max_bytes=1000)
    assert not (tmp_path / "small" / "adapter_model.safetensors").exists()
    default = load_config().hooks.max_download_bytes
    detection = detect_adapter(client, "capped", version, tmp_path / "default", max_bytes=default)
    assert (detection.adapter_dir / "adapter_model.safetensors").stat().st_size > 1000
    # The worker takes the cap from its settings file, and says where the file came from.
    config = with_changes(load_config(), {"hooks": {"max_download_bytes": 1000}})
    outcome = Worker(server.url, config).process("capped", version)
    tags = client.get_model_version("capped", version).tags
    assert outcome.status == tags[STATUS] == "failed"
    assert "over hooks.max_download_bytes (1,000)" in tags[ERROR]
    assert "tunelens-hook-" not in tags[ERROR], tags[ERROR]
