"""Activation drift: where in the network the fine-tune's residual stream leaves the base's.

For a handful of texts (`evaluation.texts.drift_texts`, the first ones of the groups), the output
of every decoder layer is captured with forward hooks, first with the adapter off (the base), then
on (the candidate), on the same tokens; a full fine-tune is a model of its own, run after its
base. Per layer ℓ and token t:

    relative change  r_ℓ,t = ‖h_ft − h_base‖₂ / ‖h_base‖₂      cosine  c_ℓ,t = ⟨h_ft, h_base⟩ / (‖h_ft‖‖h_base‖)

averaged over every token of those texts. Memory stays bounded: one text at a time, and only the
base's states of that text are kept (on the CPU) while the candidate's are compared layer by layer
as they are produced and dropped (for a full fine-tune, the base's states of the drift texts are all
kept on the CPU while the fine-tune runs). The chart puts this next to the weight analysis's
S_ℓ = Σ ‖ΔW‖_F per layer (`registry_hooks.engine.analysis.layer_profiles`, from the adapter's
factors; for a full fine-tune, from the full diff of the two model folders).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelens.settings import Settings

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


def _forward_hooked(engine, who, ids: list[int], make_hook) -> None:
    """One forward pass of `engine` as `who` over `ids`, `make_hook(ℓ)` hooked on each decoder
    layer's output for the pass only."""
    import torch

    layers = decoder_layers(engine.model)
    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        with engine.active(who), torch.inference_mode():
            engine.model(input_ids=torch.tensor([ids], device=engine.device))
    finally:
        for handle in handles:
            handle.remove()


class _DriftSums:
    """Running sums of the per-token relative change and cosine, per layer."""

    def __init__(self, layers: int):
        self.relative, self.cosine, self.tokens = np.zeros(layers), np.zeros(layers), 0

    def keeper(self, kept: list):
        """Hooks that keep each layer's output (the reference's states of one text, on the CPU)."""
        def make(index):
            def hook(module, inputs, output):
                kept[index] = _output(output)[0].detach().float().cpu()
            return hook
        return make

    def comparer(self, kept: list):
        """Hooks that compare each layer's output with the kept one, then drop that one."""
        def make(index):
            def hook(module, inputs, output):
                h = _output(output)[0].detach().float().cpu()
                self.relative[index] += float(relative_change(h, kept[index]).sum())
                self.cosine[index] += float(cosine(h, kept[index]).sum())
                kept[index] = None
            return hook
        return make

    def profile(self, reference: str, candidate: str, texts: int,
                weight_delta: dict[int, float]) -> DriftProfile:
        return DriftProfile(reference, candidate, (self.relative / self.tokens).tolist(),
                            (self.cosine / self.tokens).tolist(), texts, self.tokens, weight_delta)


def layer_drift(engine, reference, candidate, token_ids: list[list[int]],
                weight_delta: dict[int, float]) -> DriftProfile:
    """Drift of `candidate` from `reference` (a engines.transformers.TransformersEngine and two Candidates)
    per decoder layer, over `token_ids`; one text at a time."""
    count = len(decoder_layers(engine.model))
    sums = _DriftSums(count)
    for ids in token_ids:
        kept: list = [None] * count
        _forward_hooked(engine, reference, ids, sums.keeper(kept))
        _forward_hooked(engine, candidate, ids, sums.comparer(kept))
        sums.tokens += len(ids)
    return sums.profile(reference.label, candidate.label, len(token_ids), weight_delta)


def model_drift(base_dir: Path, model_dir: Path, reference, candidate,
                token_ids: list[list[int]], weight_delta: dict[int, float],
                config: Settings) -> DriftProfile:
    """Drift of a model of its own (a full fine-tune in `model_dir`) from its base, per decoder
    layer: the base's layer outputs of every text are kept on the CPU, then the fine-tune's are
    compared as they come; one model in memory at a time."""
    from tunelens.evaluators.engines.transformers import TransformersEngine

    kept_by_text: list[list] = []
    engine = TransformersEngine(base_dir, config.evaluation.transformers)
    try:
        count = len(decoder_layers(engine.model))
        sums = _DriftSums(count)
        for ids in token_ids:
            kept_by_text.append([None] * count)
            _forward_hooked(engine, reference, ids, sums.keeper(kept_by_text[-1]))
    finally:
        engine.close()
    engine = TransformersEngine(model_dir, config.evaluation.transformers)
    try:
        for ids, kept in zip(token_ids, kept_by_text):
            _forward_hooked(engine, candidate, ids, sums.comparer(kept))
            sums.tokens += len(ids)
    finally:
        engine.close()
    return sums.profile(reference.label, candidate.label, len(token_ids), weight_delta)


def weight_delta_by_layer(adapter_dir: Path, config: Settings) -> dict[int, float]:
    """S_ℓ per layer from the weight analysis of the adapter's factors (no base needed)."""
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    result = analyze_adapter(adapter_dir, config=config, progress=False)
    return {profile.layer: float(profile.fro_sum) for profile in result.layers}


def full_weight_delta_by_layer(model_dir: Path, base_dir: Path, config: Settings) -> dict[int, float]:
    """S_ℓ = Σ ‖W_tuned − W_base‖_F per layer, from the full diff of the two model folders."""
    from tunelens.registry_hooks.engine.full_diff import diff_models

    result = diff_models(model_dir, base_dir, config=config, progress=False)
    return {profile.layer: float(profile.fro_sum) for profile in result.layers}


def measure_drift(engine, base_dir: Path, pairs, token_ids: list[list[int]],
                  config: Settings) -> dict[str, DriftProfile]:
    """`layer_drift` of each (reference, candidate) pair, by candidate label: on `engine` when it
    is a transformers one, else on one transformers model of the base loaded for them alone (the
    caller has closed its vLLM engine first) and closed after."""
    from tunelens.evaluators.engines.transformers import TransformersEngine

    own = engine is None or not isinstance(engine, TransformersEngine)
    if own:
        engine = TransformersEngine(base_dir, config.evaluation.transformers)
    try:
        return {candidate.label: layer_drift(engine, reference, candidate, token_ids,
                                             weight_delta_by_layer(candidate.adapter_dir, config))
                for reference, candidate in pairs}
    finally:
        if own:
            engine.close()
