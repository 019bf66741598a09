"""Activation drift: where in the network the fine-tune's residual stream leaves the base's.

For a handful of texts (`evaluation.texts.drift_texts`, the first ones of the groups), the output
of every decoder layer is captured with forward hooks, first with the adapter off (the base), then
on (the candidate), on the same tokens. Per layer ℓ and token t:

    relative change  r_ℓ,t = ‖h_ft − h_base‖₂ / ‖h_base‖₂      cosine  c_ℓ,t = ⟨h_ft, h_base⟩ / (‖h_ft‖‖h_base‖)

averaged over every token of those texts. Memory stays bounded: one text at a time, and only the
base's states of that text are kept (on the CPU) while the candidate's are compared layer by layer
as they are produced and dropped. The chart puts this next to the weight analysis's S_ℓ = Σ ‖ΔW‖_F
per layer (`registry_hooks.engine.analysis.layer_profiles`, from the adapter's factors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DRIFT_FILE = "tunelens/activation_drift.json"
DRIFT_CHART = "tunelens/activation_drift.png"


@dataclass(frozen=True)
class DriftProfile:
    """Per decoder layer (index ℓ = the layer's output), the candidate's drift from the base."""

    reference: str
    candidate: str
    relative_change: list[float]  # mean over tokens of ‖h_ft − h_base‖ / ‖h_base‖
    cosine: list[float]  # mean over tokens of cos(h_ft, h_base)
    texts: int
    tokens: int
    weight_delta: dict[int, float]  # S_ℓ = Σ_components ‖ΔW‖_F, from the weight analysis

    def to_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "texts": self.texts,
                "tokens": self.tokens,
                "layers": [{"layer": i, "relative_change": r, "cosine": c,
                            "weight_delta_fro": self.weight_delta.get(i)}
                           for i, (r, c) in enumerate(zip(self.relative_change, self.cosine))]}

    def metrics(self) -> dict[str, float]:
        return {"drift/relative_change_max": max(self.relative_change),
                "drift/relative_change_last": self.relative_change[-1],
                "drift/cosine_last": self.cosine[-1]}


def decoder_layers(model):
    """The ModuleList of decoder layers (as many as config.num_hidden_layers)."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and name.endswith("layers")
                and (count is None or len(module) == count)):
            return module
    raise ValueError("no decoder layer list found in the model")


def relative_change(h_other, h_base):
    """Per token ‖h_other − h_base‖₂ / ‖h_base‖₂ (the hidden dimension last)."""
    return (h_other - h_base).norm(dim=-1) / h_base.norm(dim=-1).clamp_min(1e-12)


def cosine(h_other, h_base):
    """Per token ⟨h_other, h_base⟩ / (‖h_other‖₂ ‖h_base‖₂)."""
    import torch

    return torch.nn.functional.cosine_similarity(h_other, h_base, dim=-1, eps=1e-12)


def _output(output):
    return output[0] if isinstance(output, tuple) else output


def layer_drift(engine, reference, candidate, token_ids: list[list[int]],
                weight_delta: dict[int, float]) -> DriftProfile:
    """Drift of `candidate` from `reference` (a backends.TransformersBackend and two Candidates)
    per decoder layer, over `token_ids`; one text at a time."""
    import torch

    layers = decoder_layers(engine.model)
    count = len(layers)
    rel_sum, cos_sum = np.zeros(count), np.zeros(count)
    tokens = 0
    for ids in token_ids:
        batch = torch.tensor([ids], device=engine.device)
        kept: list = [None] * count

        def keep(index):
            def hook(module, inputs, output):
                kept[index] = _output(output)[0].detach().float().cpu()
            return hook

        def compare(index):
            def hook(module, inputs, output):
                h = _output(output)[0].detach().float().cpu()
                rel_sum[index] += float(relative_change(h, kept[index]).sum())
                cos_sum[index] += float(cosine(h, kept[index]).sum())
                kept[index] = None  # this layer's base states are done with
            return hook

        for make, who in ((keep, reference), (compare, candidate)):
            handles = [layer.register_forward_hook(make(i)) for i, layer in enumerate(layers)]
            try:
                with engine.active(who), torch.inference_mode():
                    engine.model(input_ids=batch)
            finally:
                for handle in handles:
                    handle.remove()
        tokens += len(ids)
    return DriftProfile(reference.label, candidate.label, (rel_sum / tokens).tolist(),
                        (cos_sum / tokens).tolist(), len(token_ids), tokens, weight_delta)


def weight_delta_by_layer(adapter_dir: Path, config: dict) -> dict[int, float]:
    """S_ℓ per layer from the weight analysis of the adapter's factors (no base needed)."""
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    result = analyze_adapter(adapter_dir, config=config, progress=False)
    return {profile.layer: float(profile.fro_sum) for profile in result.layers}


def measure_drift(engine, base_dir: Path, pairs, token_ids: list[list[int]],
                  config: dict) -> dict[str, DriftProfile]:
    """`layer_drift` of each (reference, candidate) pair, by candidate label: on `engine` when it
    is a transformers one, else on one transformers model of the base loaded for them alone (the
    caller has closed its vLLM engine first) and closed after."""
    from .backends import TransformersBackend

    own = engine is None or not isinstance(engine, TransformersBackend)
    if own:
        engine = TransformersBackend(base_dir, config["evaluation"]["transformers"])
    try:
        return {candidate.label: layer_drift(engine, reference, candidate, token_ids,
                                             weight_delta_by_layer(candidate.adapter_dir, config))
                for reference, candidate in pairs}
    finally:
        if own:
            engine.close()
