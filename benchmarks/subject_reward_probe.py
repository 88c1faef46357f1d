"""Why the tiny demo's answers lost their subject (README "What `make demo` does"): what the demo's
reward (MiniLM cosine) gives a held-out reference answer, the same answer without its subject noun,
and with "and" in its place, scored against its own reference and against the other topics' ones
(what a policy that ignores the prompt earns on average). Prints the numbers the README quotes.

    .venv/bin/python benchmarks/subject_reward_probe.py
"""

import torch

from nemo_rlsr.data.instructions import load_instructions
from nemo_rlsr.rewards import EmbeddingSimilarityReward


def main() -> None:
    reward = EmbeddingSimilarityReward()
    by_topic = {e.topic: e.reference for e in load_instructions(split="heldout")}
    topics = sorted(by_topic)
    references = [by_topic[t] for t in topics]
    forms = {"with its subject": references,
             "without its subject": [r.replace(" " + t, "", 1) for t, r in zip(topics, references)],
             "'and' as subject": [r.replace(" " + t + " ", " and ", 1) for t, r in zip(topics, references)]}
    targets = reward.embed(references)
    others = ~torch.eye(len(topics), dtype=torch.bool)
    for name, texts in forms.items():
        cosine = reward.embed(texts) @ targets.T
        print(f"{name:20s} own reference {cosine.diag().mean():.3f}   other topics' references {cosine[others].mean():.3f}")


if __name__ == "__main__":
    main()
