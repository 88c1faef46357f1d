"""Per-step reward diagnostics, for spotting reward hacking.

A policy optimising a cosine reward can game it without answering better: drift to one
generic "centroid" answer (the cosine histogram narrows to one bin), write nothing
(empty responses still get a cosine), grow or shrink its answers because length moves
the embedding (the correlation of reward with length), or hide content past the
encoder's window (responses cut by the encoder). These numbers make that visible next
to the mean reward. All are computed over the whole step (every rank's rollouts).

With several reward terms (terms.py) a policy can also game one term: the groups whose rewards tie
(GRPO learns nothing from them), the responses' length against their references' and the trend of
the policy's entropy (collapsing exploration) show it across terms.

Where the prompts name a topic (the bundled demo set), a policy can also keep most of the cosine
while dropping the answer's subject ("a loyal pet that barks ..." or "a and is a loyal pet ..." for
"a dog is a loyal pet ..."): the topic-subject flags count the responses that still name it.
"""

from __future__ import annotations

import torch

from nemo_rlsr.algorithms.grpo import ZERO_STD
from nemo_rlsr.data.tokenizer import split_words

from .result import RewardResult

__all__ = ["HIST_BINS", "TrendWindow", "length_ratios", "reward_diagnostics", "slope", "tied_group_fraction",
           "topic_subject_flags"]

HIST_BINS = 10  # over [-1, 1]: bin k counts cosines in [-1 + 0.2k, -1 + 0.2(k+1)), the last bin includes 1


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 0.0 when either side is constant (no signal, not NaN)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def reward_diagnostics(result: RewardResult, lengths: torch.Tensor) -> dict[str, float]:
    """Metrics of one step from its results (boolean fields may arrive as floats, e.g. after a
    gather) and the responses' lengths in tokens."""
    cosine = result.cosine.float()
    hist = torch.histc(cosine, bins=HIST_BINS, min=-1.0, max=1.0) if len(cosine) else torch.zeros(HIST_BINS)
    metrics = {f"reward/cos_hist_{k}": float(c) for k, c in enumerate(hist.tolist())}
    n = max(len(cosine), 1)
    measured = result.repeat_length[result.repeat_length >= 0].float()
    metrics.update({
        "reward/fraction_empty": float(result.empty.float().sum()) / n,
        "reward/length_corr": _pearson(result.rewards, lengths) if len(cosine) > 1 else 0.0,
        "reward/encoder_truncated": float(result.cut.float().sum()),
        "reward/encoder_chunked": float(result.chunked.float().sum()),
        "reward/repeat_len_mean": float(measured.mean()) if len(measured) else 0.0,
        "reward/repeat_len_max": float(measured.max()) if len(measured) else 0.0,
    })
    return metrics


def tied_group_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """The fraction of groups (``group_size`` contiguous rows) whose rewards tie: a std at most the
    threshold under which GRPO gives the whole group advantage 0 (algorithms/grpo.py)."""
    if rewards.numel() == 0:
        return 0.0
    std = rewards.double().view(-1, group_size).std(dim=1)
    return float((~(std > ZERO_STD)).double().mean())


def length_ratios(responses: list[str], references: list[str]) -> torch.Tensor:
    """Each response's length over its reference's, in characters (tokenizer-independent): a mean
    drifting away from 1 is a policy changing its length to move the reward, not its content."""
    return torch.tensor([len(r) / max(len(ref), 1) for r, ref in zip(responses, references)], dtype=torch.float64)


LEADING_ARTICLES = frozenset({"a", "an", "the"})


def _after_leading_article(text: str) -> list[str]:
    """The words after the response's leading article, lowercased ("A dog is ..." -> ["dog", "is",
    ...]); [] when it does not open with an article (then it names no subject in the demo's form)."""
    words = split_words(text)
    return words[1:] if words and words[0] in LEADING_ARTICLES else []


def topic_subject_flags(responses: list[str], topics: list[str | None]) -> torch.Tensor:
    """1.0 where a response's subject (the words after its leading article) is its prompt's topic,
    0.0 where it is not, NaN where the prompt has no topic: `nanmean` is the topic-subject rate."""
    flags = []
    for response, topic in zip(responses, topics, strict=True):
        if topic is None:
            flags.append(float("nan"))
            continue
        want = split_words(topic)
        flags.append(float(bool(want) and _after_leading_article(response)[: len(want)] == want))
    return torch.tensor(flags, dtype=torch.float64)


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` per step (0.0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    y = torch.tensor(values, dtype=torch.float64)
    return float((x * (y - y.mean())).sum() / x.square().sum())


class TrendWindow:
    """The last `size` values of a per-step metric and their `slope`; saved in the checkpoint's run
    state (trainer/state.py), so a resumed run logs the trend the uninterrupted one would."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[float] = []

    def add(self, value: float) -> float:
        """Record this step's value; returns the slope over the window."""
        self.values = (self.values + [float(value)])[-self.size:]
        return slope(self.values)

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = [float(v) for v in state["values"]][-self.size:]
