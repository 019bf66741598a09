"""The built wheel installs into a fresh venv and `tunelens analyze` works from it.

Dependencies come from the locked environment, reused by path (a `.pth` line naming its
site-packages) instead of re-installed: downloading and unpacking torch, transformers, mlflow and
the rest again would take minutes and the network, and would test pip rather than the wheel. What
this checks is the wheel itself: its packages, package data (conf.yaml, report templates) and
console script, imported from the fresh venv and not from this checkout; and that the lock
satisfies every requirement the wheel declares.
"""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
from packaging.requirements import Requirement

from support import REPO


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_wheel_installs_in_a_fresh_venv_and_analyses(tmp_path, llama_adapter, llama_base):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(REPO)], check=True,
                   cwd=tmp_path, capture_output=True)
    (wheel,) = dist.glob("mlflow_tunelens-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(archive.read(n) for n in names if n.endswith(".dist-info/METADATA"))
    assert "tunelens/conf.yaml" in names
    assert "tunelens/registry_hooks/report/templates/report.html" in names
    assert "tunelens/evaluators/pages/templates/side_by_side.html" in names
    assert not any(n.startswith(("tests/", "plugin/", "registry_hooks/")) for n in names)

    # Every declared requirement is met by the lock the project tests with.
    pins = _lock()
    for line in metadata.decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            requirement = Requirement(line.split(":", 1)[1].strip())
            key = requirement.name.lower().replace("_", "-")
            assert key in pins, f"{requirement} is declared but not in requirements.lock"
            assert requirement.specifier.contains(pins[key], prereleases=True), \
                f"{requirement} does not admit the locked {pins[key]}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True).stdout.strip())
    locked_site = Path(mlflow.__file__).resolve().parents[1]
    (site / "locked-dependencies.pth").write_text(f"{locked_site}\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, cwd=tmp_path, capture_output=True)

    where = subprocess.run([str(python), "-c", "import tunelens.registry_hooks.engine.analysis "
                            "as m; print(m.__file__)"], check=True, capture_output=True,
                           text=True, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(site), where
    out = tmp_path / "out"
    done = subprocess.run([str(venv / "bin" / "tunelens"), "analyze", str(llama_adapter),
                           "--base", str(llama_base), "--out", str(out), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "14 modules analysed" in done.stdout
    result = json.loads((out / "analysis.json").read_text())
    assert len(result["modules"]) == 14 and (out / "report.html").stat().st_size > 0
