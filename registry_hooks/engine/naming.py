"""Module paths -> layer index, component and group; fused projections -> parts.

Covers the naming of Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, GPT-NeoX and Falcon checkpoints.
Names here are PEFT module paths with the `base_model.model.` prefix already removed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .result import ModuleMetrics

PEFT_PREFIX = "base_model.model."

# `<container>.<index>.` where the container is a stack of transformer blocks:
# Llama/Mistral/Qwen/Gemma/Phi-3/NeoX `layers`, GPT-2/Falcon `h`, BERT-like `layer`, others `blocks`.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.(.+)$")

_ATTENTION_WORDS = ("attn", "attention")
_ATTENTION_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn",
                     "query", "key", "value", "out_proj", "Wqkv"}
_MLP_WORDS = ("mlp", "feed_forward", "ffn", "moe")  # moe: Mixtral's block_sparse_moe experts
_MLP_LEAVES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc",
               "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3"}
_EMBEDDING_LEAVES = {"embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "lm_head",
                     "embed_out", "embeddings"}

@dataclass(frozen=True)
class ModulePath:
    """Where a module sits: layer index (None outside the block stack), component, group."""

    layer: int | None
    component: str
    group: str  # "attention" | "mlp" | "embedding" | "other"


def strip_peft_prefix(key: str) -> str:
    """`base_model.model.x.y` -> `x.y` (PEFT's wrapper prefix in saved adapter keys)."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def parse_module_path(name: str) -> ModulePath:
    """Layer index, the path after it (the component) and the group of module path `name`."""
    match = _LAYER.search(name)
    if match:
        layer, component = int(match.group(1)), match.group(2)
    else:
        layer, component = None, name
    return ModulePath(layer, component, module_group(component))


def module_group(component: str) -> str:
    """attention / mlp / embedding / other, from the words in a component path."""
    segments = component.split(".")
    leaf = _fused_leaf(segments)
    if any(word in seg for seg in segments[:-1] for word in _ATTENTION_WORDS) or leaf in _ATTENTION_LEAVES:
        return "attention"
    if any(word in seg for seg in segments[:-1] for word in _MLP_WORDS) or leaf in _MLP_LEAVES:
        return "mlp"
    if leaf in _EMBEDDING_LEAVES or "embed" in leaf:
        return "embedding"
    return "other"


def _fused_leaf(segments: list[str]) -> str:
    """The module's own name: for a split part (`c_attn.q`) the fused module's name."""
    if len(segments) > 1 and segments[-1] in ("q", "k", "v", "gate", "up"):
        return segments[-2]
    return segments[-1]


@dataclass(frozen=True)
class FusedSplit:
    """Row ranges (Linear orientation) of a fused projection's parts, or why it stays unsplit."""

    parts: list[tuple[str, int, int]]  # (suffix, start, stop)
    needs_base_config: str | None = None  # set when the sizes need the base config.json


def fused_split(name: str, out_features: int, base_config: dict | None) -> FusedSplit | None:
    """Parts of a fused Q/K/V or gate/up projection; None when `name` is not a fused projection.

    Phi-3 `qkv_proj`: Q = heads·head_dim rows, then K and V = kv_heads·head_dim rows each (sizes from
    the base config.json). `gate_up_proj`: gate then up, half each. GPT-2 `c_attn`: q, k, v, a third
    each (the adapter's own shape says it all).
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gate_up_proj":
        return _equal_parts(name, out_features, ("gate", "up"))
    if leaf == "c_attn":
        return _equal_parts(name, out_features, ("q", "k", "v"))
    if leaf != "qkv_proj":
        return None
    if not base_config or "num_attention_heads" not in base_config:
        return FusedSplit([], needs_base_config=(
            f"{name}: Q/K/V split of the fused qkv_proj (its sizes come from the base config.json)"))
    heads = int(base_config["num_attention_heads"])
    kv_heads = int(base_config.get("num_key_value_heads") or heads)
    head_dim = int(base_config.get("head_dim") or base_config["hidden_size"] // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    if q + 2 * kv != out_features:
        raise ValueError(f"{name} has {out_features} output rows but the base config.json gives "
                         f"Q+K+V = {q}+{kv}+{kv} = {q + 2 * kv}: is the base the right model?")
    return FusedSplit([("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)])


def _equal_parts(name: str, out_features: int, suffixes: tuple[str, ...]) -> FusedSplit:
    size, rest = divmod(out_features, len(suffixes))
    if rest:
        raise ValueError(f"{name} has {out_features} output rows, not divisible into "
                         f"{len(suffixes)} equal parts ({'/'.join(suffixes)})")
    return FusedSplit([(s, i * size, (i + 1) * size) for i, s in enumerate(suffixes)])


# Attention roles by the last segment of a component path (after a fused projection's part
# suffix): Llama/Mistral/Qwen/Gemma/Phi-3 *_proj, GPT-2 c_attn.q/k/v + c_proj, NeoX/Falcon dense.
_ATTENTION_ROLES = {
    "q_proj": "Q", "q": "Q", "query": "Q", "k_proj": "K", "k": "K", "key": "K",
    "v_proj": "V", "v": "V", "value": "V", "o_proj": "O", "out_proj": "O", "c_proj": "O",
    "dense": "O", "o": "O", "qkv_proj": "QKV", "c_attn": "QKV", "query_key_value": "QKV",
    "Wqkv": "QKV",
}
ROLE_ORDER = ("Q", "K", "V", "O", "QKV")


def attention_role(module: ModuleMetrics) -> str | None:
    """Q, K, V, O (or QKV for an unsplit fused projection) for an attention module, else None."""
    if module.group != "attention":
        return None
    return _ATTENTION_ROLES.get(module.component.rsplit(".", 1)[-1])
