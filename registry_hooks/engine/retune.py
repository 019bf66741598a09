"""Targeted re-tuning: the layers where learning landed, as ready PEFT LoraConfig files.

Layers are ranked by S_ℓ = Σ ‖ΔW‖_F over one group's components (attention and MLP separately);
"soloist" re-tunes the top layer alone, "ensemble" the top three. Each JSON file loads with
`peft.LoraConfig(**json.load(f))`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .naming import PART_SUFFIXES
from .result import AdapterInfo, AnalysisResult

PLANS = {"soloist": 1, "ensemble": 3}
GROUPS = ("attention", "mlp")
DEFAULT_RANK = 16  # for a full fine-tune diff, which has no LoRA rank of its own


@dataclass
class RetunePlan:
    """One LoraConfig to write: which layers and module names, and why (their S_ℓ)."""

    name: str  # e.g. "soloist_mlp"
    group: str
    layers: list[int]
    scores: list[float]  # S_ℓ of those layers within the group
    target_modules: list[str]
    config: dict


def rank_layers(result: AnalysisResult, group: str) -> list[tuple[int, float]]:
    """(layer, S_ℓ within `group`) from most to least changed; layers without the group left out."""
    scored = [(p.layer, p.groups.get(group, 0.0)) for p in result.layers if p.groups.get(group)]
    return sorted(scored, key=lambda item: (-item[1], item[0]))


def group_targets(result: AnalysisResult, group: str) -> list[str]:
    """PEFT target_modules for `group`: its component paths (`self_attn.q_proj`), fused parts merged
    back (`attn.c_attn.q` -> `attn.c_attn`). Paths, not leaf names: GPT-2's `c_proj` is both an
    attention and an MLP module, and PEFT matches a target as a suffix of the module path."""
    names = set()
    for m in result.modules:
        if m.group == group and m.layer is not None:
            segments = m.component.split(".")
            if segments[-1] in PART_SUFFIXES and len(segments) > 1:
                segments = segments[:-1]
            names.add(".".join(segments))
    return sorted(names)


def retune_plans(result: AnalysisResult) -> list[RetunePlan]:
    """Soloist and ensemble plans for attention and for MLP (skipped where the group is absent)."""
    base = {"r": DEFAULT_RANK, "lora_alpha": 2 * DEFAULT_RANK, "use_rslora": False,
            "task_type": "CAUSAL_LM"}
    adapter = result.adapter
    if isinstance(adapter, AdapterInfo):  # re-tune with the adapter's own settings
        base.update(r=adapter.r or DEFAULT_RANK,
                    lora_alpha=adapter.lora_alpha or 2 * (adapter.r or DEFAULT_RANK),
                    use_rslora=adapter.use_rslora, task_type=adapter.task_type or "CAUSAL_LM")
        if adapter.fan_in_fan_out:
            base["fan_in_fan_out"] = True
    plans = []
    for group in GROUPS:
        ranked, targets = rank_layers(result, group), group_targets(result, group)
        if not ranked or not targets:
            continue
        for plan, top in PLANS.items():
            chosen = ranked[:top]
            layers = sorted(layer for layer, _ in chosen)
            config = {**base, "target_modules": targets, "layers_to_transform": layers}
            plans.append(RetunePlan(f"{plan}_{group}", group, layers,
                                    [score for _, score in chosen], targets, config))
    return plans


def write_retune_configs(result: AnalysisResult, out_dir: str | Path) -> list[Path]:
    """out_dir/<plan>_<group>.json for every plan: each loads with peft.LoraConfig(**json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for plan in retune_plans(result):
        path = out / f"{plan.name}.json"
        path.write_text(json.dumps(plan.config, indent=1), encoding="utf-8")
        paths.append(path)
    return paths
