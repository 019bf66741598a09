"""A synthetic grammar-correction task, generated locally with a fixed seed.

Each example is one sentence with one error of a known kind and its correction. The demo base model
is pre-trained to answer like a chatty assistant ("The corrected sentence is: ... Explanation: ...")
except for a missing "an", which it fixes plainly (so it starts at a low but non-zero exact match);
the LoRA adapter teaches it to answer with the correction only.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SUBJECTS_SINGULAR = ["She", "He", "My brother", "The teacher", "Our neighbour", "The dog", "Anna",
                     "My friend", "The manager", "Tom", "My sister", "The doctor", "Her cousin",
                     "The pilot", "His uncle", "Maria"]
SUBJECTS_PLURAL = ["They", "We", "My parents", "The students", "Our neighbours", "The dogs",
                   "The children", "My friends", "The players", "Their teachers", "The nurses",
                   "Both girls"]
VERBS = [("go", "goes", "to school every day"), ("like", "likes", "green tea"),
         ("play", "plays", "football on sunday"), ("want", "wants", "a new bike"),
         ("read", "reads", "the news at night"), ("walk", "walks", "to the park"),
         ("need", "needs", "more time"), ("cook", "cooks", "dinner for us"),
         ("watch", "watches", "the game"), ("visit", "visits", "the museum"),
         ("write", "writes", "a long letter"), ("drink", "drinks", "cold water"),
         ("sing", "sings", "in the choir"), ("clean", "cleans", "the kitchen")]
ADJECTIVES = ["happy", "tired", "late", "ready", "hungry", "busy", "quiet", "right", "angry",
              "early"]
VOWEL_NOUNS = ["apple", "orange", "umbrella", "egg", "old car", "idea", "hour", "email"]
CONSONANT_NOUNS = ["banana", "book", "car", "pen", "house", "letter", "cat", "job"]

PROMPT_TEMPLATE = "Fix the grammar: {sentence}\nAnswer:"
EXPLANATIONS = {
    "agreement": "The verb must agree with its subject.",
    "was_were": "Use were with plural subjects and was with singular ones.",
    "article_an": "Use an before a vowel sound.",
    "article_a": "Use a before a consonant sound.",
}


@dataclass(frozen=True)
class Example:
    """One sentence with one error, its correction, and the kind of error."""

    wrong: str
    right: str
    kind: str

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(sentence=self.wrong)

    def verbose_answer(self) -> str:
        """What the demo base says: a preamble, the correction, an explanation."""
        return f" The corrected sentence is: {self.right} Explanation: {EXPLANATIONS[self.kind]}"

    def concise_answer(self) -> str:
        """What the fine-tune should say: the correction only."""
        return f" {self.right}"


def _agreement(rng: random.Random) -> Example:
    subject = rng.choice(SUBJECTS_SINGULAR)
    base, third, rest = rng.choice(VERBS)
    return Example(f"{subject} {base} {rest}.", f"{subject} {third} {rest}.", "agreement")


def _was_were(rng: random.Random) -> Example:
    adjective = rng.choice(ADJECTIVES)
    if rng.random() < 0.5:
        subject = rng.choice(SUBJECTS_PLURAL)
        return Example(f"{subject} was {adjective}.", f"{subject} were {adjective}.", "was_were")
    subject = rng.choice(SUBJECTS_SINGULAR)
    return Example(f"{subject} were {adjective}.", f"{subject} was {adjective}.", "was_were")


def _article(rng: random.Random) -> Example:
    subject = rng.choice(SUBJECTS_SINGULAR + SUBJECTS_PLURAL)
    if rng.random() < 0.5:
        noun = rng.choice(VOWEL_NOUNS)
        return Example(f"{subject} saw a {noun}.", f"{subject} saw an {noun}.", "article_an")
    noun = rng.choice(CONSONANT_NOUNS)
    return Example(f"{subject} saw an {noun}.", f"{subject} saw a {noun}.", "article_a")


GENERATORS = (_agreement, _agreement, _was_were, _article)


def generate(count: int, seed: int) -> list[Example]:
    """`count` distinct examples drawn with `seed` (agreement errors twice as often as the others)."""
    rng = random.Random(seed)
    seen: dict[str, Example] = {}
    while len(seen) < count:
        example = rng.choice(GENERATORS)(rng)
        seen.setdefault(example.wrong, example)
    return list(seen.values())


def split(examples: list[Example], test_share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A fixed shuffle, then the last `test_share` held out for evaluation."""
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    cut = int(len(shuffled) * (1 - test_share))
    return shuffled[:cut], shuffled[cut:]
