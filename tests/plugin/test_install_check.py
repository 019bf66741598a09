"""Torch extension wheels built for another torch are refused with one line naming the fix."""
from __future__ import annotations

from importlib import metadata

import pytest

from support.cli_support import assert_one_line_error
from tunelens.plugin.install_check import check_torch_extensions, mismatched_extensions


def _install_metadata(site, name: str, version: str, requires: list[str]) -> None:
    """The dist-info pip writes for a wheel (metadata only: nothing here imports it)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_locked_environment_passes():
    assert mismatched_extensions() == []
    check_torch_extensions()


def test_pypi_wheels_beside_a_cpu_torch_are_named_with_the_uninstall_line(site, capsys):
    torch = metadata.version("torch")
    assert "+" in torch, "the lock installs a +cpu torch"
    release = torch.split("+")[0]
    _install_metadata(site, "torchvision", "0.99.0", [f"torch=={release}"])  # PyPI's CUDA build
    _install_metadata(site, "torchaudio", "2.99.0", ["torch==1.0.0"])  # another torch release
    found = {name: why for name, _, why in mismatched_extensions()}
    assert found == {"torchvision": "not a +cpu build", "torchaudio": "built for torch 1.0.0"}
    assert_one_line_error(capsys, ["analyze", "x"], "torchvision 0.99.0",
                          "pip uninstall -y torchvision torchaudio torchcodec")


def test_matching_cpu_builds_are_accepted(site):
    torch = metadata.version("torch")
    _install_metadata(site, "torchvision", "0.99.0+cpu", [f"torch=={torch}"])
    assert mismatched_extensions() == []
