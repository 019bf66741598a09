"""One prompt and one set of generation settings, shared by every model in a comparison."""
from __future__ import annotations

from dataclasses import dataclass

from tunelens.errors import TunelensError


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings applied identically to the base and every adapter."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    prompt_template: str = "{input}"
    chat_template: bool = False
    system_prompt: str | None = None

    @classmethod
    def from_config(cls, evaluation: dict, *, max_new_tokens: int | None = None
                    ) -> "GenerationSettings":
        gen = evaluation["generation"]
        settings = cls(max_new_tokens=int(max_new_tokens or gen["max_new_tokens"]),
                       temperature=float(gen["temperature"]), top_p=float(gen["top_p"]),
                       seed=int(gen["seed"]), stop=tuple(gen["stop"] or ()),
                       prompt_template=gen["prompt_template"],
                       chat_template=bool(gen["chat_template"]),
                       system_prompt=gen["system_prompt"] or None)
        if settings.max_new_tokens < 1:
            raise TunelensError("max new tokens must be at least 1")
        if "{input}" not in settings.prompt_template:
            raise TunelensError("evaluation.generation.prompt_template must contain {input}")
        return settings

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
