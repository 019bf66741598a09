"""Module paths -> layer index, component and group; fused projections -> parts.

Covers the naming of Llama, Mistral, Qwen2/3(-MoE), Mixtral, Gemma, Phi-3, GPT-2, GPT-NeoX, Falcon,
Bloom and GPT-OSS checkpoints: the family tables are at the end of this module.
Names here are PEFT module paths with the `base_model.model.` prefix already removed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


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
    if len(segments) > 1 and segments[-1] in PART_SUFFIXES:
        return segments[-2]
    return segments[-1]


@dataclass(frozen=True)
class FusedSplit:
    """Output rows (Linear orientation) of each part of a fused projection, or why it stays unsplit."""

    parts: list[tuple[str, range | list[int]]]  # (suffix, rows of the fused ΔW)
    needs_base_config: str | None = None  # set when the sizes need the base config.json


def fused_split(name: str, out_features: int, base_config: dict | None) -> FusedSplit | None:
    """Parts of a fused Q/K/V or gate/up projection; None when `name` is not a fused projection.

    The leaf name says which layout (FUSED_PROJECTIONS); the per-head layouts of `qkv_proj` and
    `query_key_value` take their head counts from the base config.json, GPT-2's `c_attn` and
    `gate_up_proj` split by the adapter's own shape.
    """
    layout = FUSED_PROJECTIONS.get(name.rsplit(".", 1)[-1])
    if layout is None:
        return None
    if layout == "gate_up_halves":
        return _equal_parts(name, out_features, ("gate", "up"))
    if layout == "qkv_thirds":
        return _equal_parts(name, out_features, ("q", "k", "v"))
    heads = _head_counts(base_config)
    if heads is None:
        return FusedSplit([], needs_base_config=(
            f"{name}: Q/K/V split of the fused {name.rsplit('.', 1)[-1]} (its per-head layout "
            "comes from the base config.json)"))
    parts = _qkv_rows(layout, base_config, *heads)
    total = sum(len(rows) for _, rows in parts)
    if total != out_features:
        raise ValueError(f"{name} has {out_features} output rows but the base config.json gives "
                         f"Q+K+V = {'+'.join(str(len(r)) for _, r in parts)} = {total}: is the "
                         "base the right model?")
    return FusedSplit(parts)


def _head_counts(config: dict | None) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head_dim) from a config.json, or None without head counts."""
    if not config:
        return None
    heads = config.get("num_attention_heads") or config.get("n_head")
    if not isinstance(heads, int) or heads <= 0:
        return None
    kv_heads = (config.get("num_key_value_heads") or config.get("num_kv_heads") or heads)
    hidden = config.get("hidden_size") or config.get("n_embed")
    head_dim = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) else None)
    if not isinstance(head_dim, int) or not isinstance(kv_heads, int):
        return None
    return heads, kv_heads, head_dim


def _qkv_rows(layout: str, config: dict, heads: int, kv_heads: int, head_dim: int):
    """Rows of Q, K and V in a fused Q/K/V weight laid out as `layout` (see FUSED_PROJECTIONS)."""
    if layout == "query_key_value":  # one name, three families: the model type picks the layout
        model_type = config.get("model_type")
        if model_type == "falcon" and config.get("new_decoder_architecture"):
            layout = "grouped_q_k_v"
        elif model_type == "falcon" and config.get("multi_query", True):
            layout, kv_heads = "q_then_k_then_v", 1
        else:  # GPT-NeoX, Bloom, Falcon without multi-query (RW): per head q, k, v
            layout = "per_head_q_k_v"
    if layout == "q_then_k_then_v":  # Phi-3 qkv_proj, Falcon-7B multi-query
        q, kv = heads * head_dim, kv_heads * head_dim
        return [("q", range(0, q)), ("k", range(q, q + kv)), ("v", range(q + kv, q + 2 * kv))]
    if layout == "per_head_q_k_v":  # view(heads, 3, head_dim)
        return [(suffix, [h * 3 * head_dim + i * head_dim + d for h in range(heads)
                          for d in range(head_dim)]) for i, suffix in enumerate("qkv")]
    # grouped_q_k_v, Falcon-40B's new decoder: view(kv_heads, heads/kv_heads + 2, head_dim), per
    # group its query heads, then one key head, then one value head.
    per_group = heads // kv_heads
    slot = (per_group + 2) * head_dim
    return [("q", [g * slot + d for g in range(kv_heads) for d in range(per_group * head_dim)]),
            ("k", [g * slot + per_group * head_dim + d for g in range(kv_heads)
                   for d in range(head_dim)]),
            ("v", [g * slot + (per_group + 1) * head_dim + d for g in range(kv_heads)
                   for d in range(head_dim)])]


def _equal_parts(name: str, out_features: int, suffixes: tuple[str, ...]) -> FusedSplit:
    size, rest = divmod(out_features, len(suffixes))
    if rest:
        raise ValueError(f"{name} has {out_features} output rows, not divisible into "
                         f"{len(suffixes)} equal parts ({'/'.join(suffixes)})")
    return FusedSplit([(s, range(i * size, (i + 1) * size)) for i, s in enumerate(suffixes)])


def expert_parameter_parts(parameter: str, model_type: str | None) -> list[tuple[str, str]]:
    """(part name, layout) of one 3-D experts parameter: gate_up_proj -> gate_proj and up_proj,
    halves (Mixtral, Qwen-MoE: `.chunk(2)`) or interleaved rows (GPT-OSS: `[..., ::2]`)."""
    parts = EXPERT_FUSED_PARTS.get(parameter)
    if parts is None:
        return [(parameter, "whole")]
    layout = "interleaved" if model_type in EXPERT_GATE_UP_INTERLEAVED else "halves"
    return [(part, layout) for part in parts]


def expert_parameter_order(parameters: list[str]) -> list[str]:
    """`parameters` of one experts module in the order its class defines them (EXPERT_PARAMETERS;
    unknown names after the known, as given): PEFT wraps them in this order, so the first one
    adapted sits deepest under `.base_layer`."""
    known = [p for p in EXPERT_PARAMETERS if p in parameters]
    return known + [p for p in parameters if p not in EXPERT_PARAMETERS]


def attention_role(component: str) -> str | None:
    """Q, K, V, O (QKV for an unsplit fused projection) by a component path's last segment."""
    return ATTENTION_ROLES.get(component.rsplit(".", 1)[-1])


def role_of(module) -> str | None:
    """The attention role of an analysed module (a ModuleMetrics), None outside attention."""
    return attention_role(module.component) if module.group == "attention" else None


def matrix_type(component: str) -> str:
    """q/k/v/o/gate/up/down (or the leaf name) of a component path such as `self_attn.q_proj`."""
    leaf = component.rsplit(".", 1)[-1]
    return MATRIX_TYPES.get(leaf, leaf)


# ---- The architecture naming table: every family-specific name the engine and report use. ----

# Fused projections by leaf name -> how their output rows split (fused_split):
#   gate_up_halves   gate then up, half each (Phi-3 gate_up_proj)
#   qkv_thirds       q, k, v, a third each (GPT-2 c_attn: the adapter's own shape says it all)
#   q_then_k_then_v  all query heads, then the key heads, then the value heads (Phi-3 qkv_proj)
#   query_key_value  GPT-NeoX / Bloom: per head [q, k, v]; Falcon: per head [q, k, v] (RW),
#                    [all q, one k, one v] (multi-query 7B), per kv group [q heads, k, v] (40B)
FUSED_PROJECTIONS = {"gate_up_proj": "gate_up_halves", "c_attn": "qkv_thirds",
                     "qkv_proj": "q_then_k_then_v", "query_key_value": "query_key_value"}
# Suffixes fused_split gives the parts (`c_attn.q`); retune merges them back for target_modules.
PART_SUFFIXES = ("q", "k", "v", "gate", "up")

# Attention roles by the last segment of a component path (after a fused projection's part
# suffix): Llama/Mistral/Qwen/Gemma/Phi-3 *_proj, GPT-2 c_attn.q/k/v + c_proj, NeoX/Falcon dense.
ATTENTION_ROLES = {
    "q_proj": "Q", "q": "Q", "query": "Q", "k_proj": "K", "k": "K", "key": "K",
    "v_proj": "V", "v": "V", "value": "V", "o_proj": "O", "out_proj": "O", "c_proj": "O",
    "dense": "O", "o": "O", "qkv_proj": "QKV", "c_attn": "QKV", "query_key_value": "QKV",
    "Wqkv": "QKV",
}
ROLE_NAMES = {"Q": "Query (Q)", "K": "Key (K)", "V": "Value (V)", "O": "Output (O)",
              "QKV": "fused Q/K/V"}
ROLE_ORDER = ("Q", "K", "V", "O", "QKV")

# Within a group: attention's Q, K, V, O (fused QKV first), then the MLP's gate/up/fc before down.
LEAF_ORDER = {"qkv_proj": 0, "c_attn": 0, "query_key_value": 0, "Wqkv": 0, "q_proj": 1, "q": 1,
               "query": 1, "k_proj": 2, "k": 2, "key": 2, "v_proj": 3, "v": 3, "value": 3,
               "o_proj": 4, "out_proj": 4, "o": 4, "dense": 4, "gate_up_proj": 5, "gate_proj": 6,
               "gate": 6, "w1": 6, "up_proj": 7, "up": 7, "w3": 7, "c_fc": 7, "fc1": 7,
               "dense_h_to_4h": 7, "down_proj": 8, "w2": 8, "fc2": 8, "dense_4h_to_h": 8}

# Component leaf -> matrix type, the rows of the layer x matrix-type grid (full diff).
MATRIX_TYPES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down", "c_attn": "qkv", "qkv_proj": "qkv",
                "query_key_value": "qkv", "dense": "o", "c_proj": "proj", "c_fc": "fc",
                "gate_up_proj": "gate_up", "dense_h_to_4h": "up", "dense_4h_to_h": "down"}
TYPE_ORDER = ["q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc", "proj"]

# transformers 5 MoE experts (Mixtral, Qwen2/3-MoE, GPT-OSS, ...): one module holding 3-D
# parameters (E, out, in) (GPT-OSS: (E, in, out)), in the order the class defines them.
EXPERT_PARAMETERS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
# A fused expert parameter's parts, named like the per-expert Linear modules of older checkpoints.
EXPERT_FUSED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj")}
# Checkpoints on disk keep one Linear per expert (transformers 5 converts on load and save): an
# experts part's base weight is `<layer>.<path with e>.weight`, the first path the base holds.
EXPERT_CHECKPOINT_PATHS = {
    "gate_proj": ("mlp.experts.{e}.gate_proj", "block_sparse_moe.experts.{e}.w1"),
    "up_proj": ("mlp.experts.{e}.up_proj", "block_sparse_moe.experts.{e}.w3"),
    "down_proj": ("mlp.experts.{e}.down_proj", "block_sparse_moe.experts.{e}.w2"),
}
EXPERT_GATE_UP_INTERLEAVED = {"gpt_oss"}  # gate = rows 0::2, up = rows 1::2 (others: halves)
