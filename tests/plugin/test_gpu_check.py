"""benchmarks/gpu_check.sh, the check run whenever a GPU is lent, in its --cpu smoke form: the
same steps on tiny shapes, so the script cannot rot between GPUs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_every_step_on_the_cpu_and_prints_one_table():
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--json"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(done.stdout)
    assert table["device"] == "cpu (smoke check)"
    figures = {(row["section"], row["item"], row["figure"]): row["value"] for row in table["rows"]}
    assert figures[("analysis", "14 modules", "cpu s")] > 0  # 2 layers x 7 projections
    for model in ("base", "adapter"):
        for level in ("c1", "c2"):
            assert 0 < figures[("serving", f"{model} {level}", "ttft_p50")] \
                < figures[("serving", f"{model} {level}", "latency_p50")]
    memory = {item: value for (section, item, figure), value in figures.items()
              if section == "memory" and figure == "memory_total_gib"}
    adapter_gib = figures[("memory", "adapter", "memory_adapter_gib")]
    assert adapter_gib > 0 and memory["adapter"] > memory["base"] > 0


def test_the_gpu_check_refuses_an_unknown_argument_in_one_line():
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--gpu"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu_check.sh: unknown argument --gpu (use --cpu, --json, "
                                   "--wheels DIR)")
