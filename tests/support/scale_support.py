"""A many-module LoRA adapter, as a mixture-of-experts model's all-linear LoRA saves one.

PEFT cannot build it here: transformers fuses a MoE layer's experts into 3-D parameters that LoRA
does not wrap one by one. The file is what PEFT writes for per-expert Linear modules (Mixtral's
w1/w2/w3 under block_sparse_moe.experts.E): the same key names, adapter_config.json fields and
safetensors layout.
"""
from __future__ import annotations

import json
from pathlib import Path

EXPERT_PROJECTIONS = ("w1", "w2", "w3")


def expert_lora_adapter(out_dir: Path, *, layers: int, experts: int, size: int = 16, r: int = 2,
                        seed: int = 0) -> Path:
    """adapter_config.json + adapter_model.safetensors with layers × experts × 3 LoRA modules of
    size × size, random A and B (so every ΔW differs in size)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for expert in range(experts):
            for projection in EXPERT_PROJECTIONS:
                prefix = (f"base_model.model.model.layers.{layer}.block_sparse_moe.experts."
                          f"{expert}.{projection}")
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, size, generator=generator)
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(size, r, generator=generator)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM",
              "target_modules": list(EXPERT_PROJECTIONS),
              "base_model_name_or_path": "synthetic/mixture-of-experts"}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out_dir
