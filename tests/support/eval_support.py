"""Helpers of the evaluation tests: true greedy outputs of tiny models, written as test sets."""
from __future__ import annotations

import itertools
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from support.factories import CORPUS, make_lora_adapter


def greedy(base_dir, adapter_dir, texts: list[str], max_new_tokens: int) -> list[str]:
    """Reference outputs straight from transformers (+PEFT), one prompt at a time."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    outputs = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
            outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs


def mean_nll(base_dir, adapter_dir, texts_ids: list[list[int]]) -> list[float]:
    """Per text, the mean NLL of `ids[1:]` from transformers' own loss (labels = inputs), apart
    from tunelens."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.inference_mode():
        return [float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss)
                for ids in texts_ids]


def prompt_pool(size: int, seed: int = 0) -> list[str]:
    """`size` distinct short prompts made of the tiny tokenizer's corpus words."""
    words = sorted({word for sentence in CORPUS for word in sentence.split()})
    rng = random.Random(seed)
    prompts: list[str] = []
    for _ in itertools.count():
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))
        if prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) == size:
            return prompts
    raise AssertionError("unreachable")


def rows_owned_by(outputs: dict[str, list[str]], owners: dict[str, int], prompts: list[str]
                  ) -> tuple[list[str], list[str]]:
    """(inputs, targets): for each model in `owners`, that many rows whose target is the model's
    own greedy output and no other model's output on the row, so exactly that model is right
    there (and every model is wrong on the other owners' rows). Raises when the pool is short."""
    inputs, targets, used = [], [], set()
    for label, count in owners.items():
        unique = [i for i in range(len(prompts)) if i not in used and all(
            outputs[other][i] != outputs[label][i] for other in outputs if other != label)]
        if len(unique) < count:
            raise AssertionError(f"only {len(unique)} prompts give {label} an output no other "
                                 f"model gives; {count} needed: enlarge the pool")
        for i in unique[:count]:
            used.add(i)
            inputs.append(prompts[i])
            targets.append(outputs[label][i])
    return inputs, targets


def register_holder_and_candidate(url: str, name: str, base_dir, holder_adapter, root):
    """`holder_adapter` as version 1 of `name` (holding production) and a second adapter (r=4 on
    q, v and down) as version 2, both logged with `tunelens log-adapter`; the second's folder."""
    from mlflow import MlflowClient

    from tunelens.registry_hooks.service.log_adapter import log_adapter

    second = make_lora_adapter(base_dir, root / "v2", seed=1, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj", "down_proj"])
    for adapter in (holder_adapter, second):
        log_adapter(adapter, base_dir, registered_model_name=name, tracking_uri=url)
    MlflowClient(url).set_registered_model_alias(name, "production", "1")
    return second
