"""Fingerprints of every analysis output on fixed inputs, to show a refactor changed no result.

`fingerprint_outputs(workdir)` builds the inputs (the GPT-2 fixtures, a seeded tiny Llama with two
adapters, a perturbed full copy, a seeded checkpoint series: a real training run's numbers would
depend on the machine's floating-point kernels), runs the CLI commands a user runs
(`analyze`, `analyze --base`, a full diff, `--checkpoints`, `compare`) and digests what they wrote:
each top-level key of analysis.json / compare.json and of the data embedded in report.html (paths
made relative, floats rounded to 9 significant digits), the pages' visible text, the chart names.
tests/data/golden_outputs.json holds the digests made by the code before the package split;
`PYTHONPATH=tests python -m support.golden_outputs OUT.json` writes them anew.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import re
import sys
from pathlib import Path

from support import ADAPTER_FIXTURES as FIXTURES, REPO
DATA_ELEMENT = re.compile(r'<script[^>]*id="tunelens-data"[^>]*>(.*?)</script>', re.S)


def _normal(value, root: str):
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.9g}")
    if isinstance(value, str):
        return value.replace(root, "<ROOT>").replace(str(REPO), "<REPO>")
    if isinstance(value, dict):  # PEFT saves target_modules from a set: its order varies by run
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else _normal(v, root)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v, root) for v in value]
    return value


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _digests(document: dict, root: str) -> dict[str, str]:
    return {key: _digest(_normal(value, root)) for key, value in sorted(document.items())}


def _folder(out: Path, root: str) -> dict:
    record = {"charts": sorted(p.name for p in (out / "charts").glob("*"))}
    for name in ("analysis.json", "compare.json"):
        if (out / name).exists():
            record[name] = _digests(json.loads((out / name).read_text()), root)
    for name in ("report.html", "compare.html"):
        if (out / name).exists():
            page = (out / name).read_text()
            match = DATA_ELEMENT.search(page)
            if match:
                record[f"{name} data"] = _digests(json.loads(match.group(1)), root)
            record[f"{name} text"] = _digest(_normal(_visible_text(page), root))
    return record


def _visible_text(page: str) -> str:
    """The words a reader sees: scripts, styles and tags dropped, whitespace collapsed."""
    page = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def fingerprint_outputs(workdir: Path) -> dict:
    from support.factories import drifting_checkpoints, make_lora_adapter, perturbed_copy, tiny_llama
    from tunelens.plugin.cli import main

    root = str(workdir)
    base = tiny_llama(workdir / "base")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    first = make_lora_adapter(base, workdir / "adapter-a", r=8, lora_alpha=16, target_modules=modules)
    second = make_lora_adapter(base, workdir / "adapter-b", r=4, lora_alpha=8, seed=1,
                               target_modules=["q_proj", "v_proj"])
    tuned = perturbed_copy(base, workdir / "tuned", {"q_proj": 0.01, "mlp": 0.003})
    checkpoints = drifting_checkpoints(base, workdir / "ckpt", steps=4, save_every=2, r=4,
                                       lora_alpha=8, target_modules=["q_proj", "v_proj"])
    runs = {
        "gpt2-causal": ["analyze", str(FIXTURES / "gpt2-causal-c_attn-c_proj")],
        "gpt2-seqcls": ["analyze", str(FIXTURES / "gpt2-seqcls-c_attn")],
        "llama-with-base": ["analyze", str(first), "--base", str(base)],
        "full-diff": ["analyze", str(tuned), "--base", str(base)],
        "checkpoints": ["analyze", "--checkpoints", str(checkpoints)],
        "compare": ["compare", str(first), str(second), "--base", str(base)],
    }
    prints = {}
    for name, argv in runs.items():
        out = workdir / "out" / name
        code = main([*argv, "--out", str(out), "--no-progress"])
        assert code == 0, f"{name}: exit {code}"
        prints[name] = _folder(out, root)
    return prints


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = fingerprint_outputs(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
