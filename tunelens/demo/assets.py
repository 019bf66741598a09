"""The demo's files: a base model, two adapters and a held-out test set, built once per data dir."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelens.demo.grammar import generate, split
from tunelens.demo.training import BASE_SHAPE, TrainingPlan, build_base, train_adapter
from tunelens.settings import DemoSettings

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class DemoAssets:
    """Where the demo's generated model files and test set live."""

    base_dir: Path
    concise_adapter: Path  # learned to answer with the correction only: the one to promote
    echo_adapter: Path  # trained on a corrupted set whose targets are the inputs: the one to reject
    test_set: Path  # JSONL with `inputs` (the prompt) and `targets` (the corrected sentence)
    # Text groups for perplexity, from the test set: the task (prompt and corrected sentence, as
    # JSONL "text") and general text (the corrected sentences alone, blank-line separated)
    task_texts: Path
    general_texts: Path

    def text_groups(self) -> list[str]:
        """The groups as `tunelens evaluate --texts` takes them."""
        return [f"grammar={self.task_texts}", f"general={self.general_texts}"]


def build_assets(data_dir: Path, settings: DemoSettings) -> DemoAssets:
    """Generate data, pre-train the base and train both adapters, or reuse them if `settings` and
    the base's shape are those they were built with."""
    root = Path(data_dir) / "demo-models"
    assets = DemoAssets(root / "base", root / "adapter-concise", root / "adapter-echo",
                        root / "grammar-test.jsonl", root / "texts-grammar.jsonl",
                        root / "texts-general.txt")
    stamp = root / "settings.json"
    recipe = {**settings.model_dump(), "base_shape": BASE_SHAPE}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        _write_text_groups(assets)
        return assets
    # One thread: with other work on the cores, two threads wait on each other (a training step of
    # this model took 6.3 s on two threads, 1.2 s on one, at load 10 on 2 cores); and one thread
    # adds in the same floating-point order, so the weights do not depend on the load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _build(assets, settings)
    finally:
        torch.set_num_threads(threads)
    stamp.write_text(json.dumps(recipe, indent=1))
    return assets


def _build(assets: DemoAssets, settings: DemoSettings) -> None:
    seed = settings.seed
    train, test = split(generate(settings.examples, seed), settings.test_share, seed)
    build_base(train, assets.base_dir, TrainingPlan(**settings.base_training.model_dump()), seed)
    adapter_plan = TrainingPlan(**settings.adapter_training.model_dump())
    lora = dict(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank,
                target_modules=TARGET_MODULES)
    train_adapter(assets.base_dir, train, [e.concise_answer() for e in train],
                  assets.concise_adapter, adapter_plan, seed, **lora)
    train_adapter(assets.base_dir, train, [f" {e.wrong}" for e in train],
                  assets.echo_adapter, adapter_plan, seed + 1, **lora)
    with assets.test_set.open("w") as out:
        for example in test:
            out.write(json.dumps({"inputs": example.prompt, "targets": example.right,
                                  "error_kind": example.kind}) + "\n")
    _write_text_groups(assets)


def _write_text_groups(assets: DemoAssets) -> None:
    rows = [json.loads(line) for line in assets.test_set.read_text().splitlines() if line.strip()]
    assets.task_texts.write_text("".join(json.dumps({"text": f"{r['inputs']} {r['targets']}"})
                                         + "\n" for r in rows))
    assets.general_texts.write_text("\n\n".join(r["targets"] for r in rows) + "\n")

