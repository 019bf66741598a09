"""The machine and library tags every analysis and evaluation run carries."""
from __future__ import annotations

import os
from importlib import metadata

from tunelens.machine import Gpus, Machine, nvidia_gpus, this_machine


def test_this_machine_reads_cores_memory_and_installed_libraries():
    machine = this_machine()
    assert machine.cpu_count == len(os.sched_getaffinity(0))
    assert machine.memory_gib > 0.1 and machine.cpu_model
    assert machine.libraries["mlflow"] == metadata.version("mlflow")


def test_gpus_come_from_nvidia_smi_where_it_exists(tmp_path, monkeypatch):
    # No GPU here: a stand-in for nvidia-smi prints what the real one prints for two cards.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 550.54.15'\n"
                   "echo 'NVIDIA H100 80GB HBM3, 550.54.15'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert nvidia_gpus() == Gpus("NVIDIA H100 80GB HBM3", 2, "550.54.15")


def test_tags_name_every_figure_and_leave_out_what_is_absent():
    with_gpu = Machine("Xeon", 16, 125.7, Gpus("H100", 2, "550.54.15"), "12.4",
                       {"mlflow": "3.3.0", "torch": "2.4.0"})
    assert with_gpu.tags() == {
        "tunelens.machine.cpu_model": "Xeon", "tunelens.machine.cpu_count": "16",
        "tunelens.machine.memory_gib": "125.7", "tunelens.machine.gpu_count": "2",
        "tunelens.machine.gpu_model": "H100", "tunelens.machine.gpu_driver": "550.54.15",
        "tunelens.machine.cuda": "12.4", "tunelens.library.mlflow": "3.3.0",
        "tunelens.library.torch": "2.4.0"}
    cpu_only = Machine("Xeon", 2, 23.5, None, None, {"mlflow": "3.17.2"}).tags()
    assert cpu_only["tunelens.machine.gpu_count"] == "0"
    assert not any(key.endswith(("gpu_model", "gpu_driver", "cuda")) for key in cpu_only)
