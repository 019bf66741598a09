"""The demo's models, built with the demo's own settings, behave as its story says.

The base answers like a chatty assistant ("The corrected sentence is: ... Explanation: ...") except
for a missing "an", which it fixes plainly; the concise adapter answers with the correction only;
the echo adapter answers with the uncorrected input. The margins asserted leave the story's verdicts
far from their thresholds on the held-out set (the concise adapter a significant gain over the base,
the echo adapter a significant loss against the concise one), checked with transformers' greedy decoding.
"""
from __future__ import annotations

import json
import time

import pytest


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    from tunelens.config import load_config
    from tunelens.demo.assets import build_assets

    settings = load_config().demo
    started = time.monotonic()
    assets = build_assets(tmp_path_factory.mktemp("demo"), settings)
    return assets, settings, time.monotonic() - started


def answers(model_dir, adapter_dir, prompts: list[str]) -> list[str]:
    """Greedy answers (64 new tokens at most, as the evaluation) for every prompt in one batch."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = LlamaForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.eval().generate(**encoded, max_new_tokens=64, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
    return [text.strip() for text in
            tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)]


def test_demo_models_behave_as_the_story_says(demo_assets):
    from tunelens.demo.assets import build_assets
    from tunelens.demo.grammar import generate, split

    assets, settings, seconds = demo_assets
    rows = [json.loads(line) for line in assets.test_set.read_text().splitlines()]
    _, test = split(generate(settings.examples, settings.seed), settings.test_share,
                    settings.seed)
    assert [row["targets"] for row in rows] == [e.right for e in test]
    prompts = [row["inputs"] for row in rows]

    base = answers(assets.base_dir, None, prompts)
    concise = answers(assets.base_dir, assets.concise_adapter, prompts)
    echo = answers(assets.base_dir, assets.echo_adapter, prompts)
    plain = [e.kind == "article_an" for e in test]
    # plain and right for a missing "an"; chatty, the right correction inside, for every other kind
    fixed_plainly = [b == e.right for b, e, p in zip(base, test, plain) if p]
    chatty = [b == e.verbose_answer().strip() for b, e, p in zip(base, test, plain) if not p]
    assert sum(fixed_plainly) >= 0.75 * len(fixed_plainly), base
    assert sum(chatty) >= 0.9 * len(chatty), base
    # the story's verdicts: the concise adapter far above the base, the echo adapter far below it
    assert sum(c == e.right for c, e in zip(concise, test)) >= 0.9 * len(test), concise
    assert sum(c == e.right for c, e in zip(echo, test)) <= 0.05 * len(test), echo
    assert sum(c == e.wrong for c, e in zip(echo, test)) >= 0.75 * len(test), echo  # the input back

    # built once per data dir: a second call with the same settings reuses the files
    stamp = assets.base_dir.parent / "settings.json"
    built = stamp.stat().st_mtime_ns
    started = time.monotonic()
    assert build_assets(assets.base_dir.parent.parent, settings) == assets
    assert stamp.stat().st_mtime_ns == built and time.monotonic() - started < 1
    print(f"demo models built in {seconds:.1f} s")
