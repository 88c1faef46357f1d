"""Synthetic rollouts with a realistic length mix, for the reward benchmarks.

Words come from the bundled instruction set's references (English prose vocabulary);
response lengths follow a log-normal in words (median ~150 words, a long tail cut at
~3,000 words = ~4k tokens, the max sequence of the paper's runs), with some empty
and some looping responses, 8 rollouts per reference like GRPO.
"""

from __future__ import annotations

import json
import random

from nemo_rlsr.data.instructions import BUNDLED_DATASET

__all__ = ["vocabulary", "random_text", "rollouts"]


def vocabulary() -> list[str]:
    words: set[str] = set()
    for line in BUNDLED_DATASET.read_text().splitlines():
        words.update(json.loads(line)["reference"].split())
    return sorted(words)


def random_text(rng: random.Random, words: list[str], num_words: int) -> str:
    return " ".join(rng.choice(words) for _ in range(num_words))


def rollouts(count: int, group: int = 8, seed: int = 0, max_words: int = 3000):
    """(prompts, responses, references) for ``count`` rollouts in groups of ``group``."""
    rng, words = random.Random(seed), vocabulary()
    prompts, responses, references = [], [], []
    for i in range(count):
        if i % group == 0:
            prompt = f"question {i // group}: " + random_text(rng, words, 12)
            reference = random_text(rng, words, int(min(max_words, rng.lognormvariate(4.6, 0.6))))
        kind = rng.random()
        if kind < 0.03:
            response = ""
        elif kind < 0.08:  # a degenerate loop
            response = (random_text(rng, words, 12) + " ") * rng.randint(5, 60)
        else:
            response = random_text(rng, words, int(min(max_words, rng.lognormvariate(5.0, 0.9))))
        prompts.append(prompt)
        responses.append(response)
        references.append(reference)
    return prompts, responses, references
