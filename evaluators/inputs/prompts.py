"""One prompt and one set of generation settings (tunelens.settings.GenerationSettings), shared
by every model in a comparison."""
from __future__ import annotations

from tunelens.errors import TunelensError
from tunelens.settings import GenerationSettings


def generation_settings(generation: GenerationSettings, max_new_tokens: int | None = None
                        ) -> GenerationSettings:
    """evaluation.generation with the command's `max_new_tokens` (when given) over the configured
    one; an empty system prompt is none."""
    wanted = int(max_new_tokens or generation.max_new_tokens)
    if wanted < 1:
        raise TunelensError("max new tokens must be at least 1")
    return generation.model_copy(update={"max_new_tokens": wanted,
                                         "system_prompt": generation.system_prompt or None})


def build_prompts(inputs: list[str], tokenizer, settings: GenerationSettings) -> list[str]:
    """Each input through the prompt template, then the tokenizer's chat template when asked."""
    texts = [settings.prompt_template.replace("{input}", text) for text in inputs]
    if not settings.chat_template:
        return texts
    if not getattr(tokenizer, "chat_template", None):
        raise TunelensError("evaluation.generation.chat_template is on but the base model's "
                            "tokenizer has no chat template: turn it off or use a chat model")
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    return [tokenizer.apply_chat_template(system + [{"role": "user", "content": text}],
                                          tokenize=False, add_generation_prompt=True)
            for text in texts]


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop string (excluded, as vLLM does) and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)
