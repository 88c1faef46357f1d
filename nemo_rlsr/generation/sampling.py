"""Token filters, seeded per-row sampling and stop-string matching: pure functions of tensors/text.

Kept apart from the engine so that each rule can be tested against a hand-computed case and reused
by any engine that samples from full-vocabulary logits.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits of each row (0 = keep all). Ties at the k-th value are all
    kept: which of two equal logits is "the" k-th is arbitrary, and dropping both would be wrong."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the top token)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def row_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one sample, from the request's seed and the sample's index within it.

    Hashed rather than added (`seed + j`), so the streams of request seeds 3 and 4 do not overlap
    when both draw several samples."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_rows(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with that row's own generator.

    Each row consumes exactly one uniform per step from its generator, so a row's tokens depend on
    its seed and its probabilities only, not on which other rows share the batch. A token with zero
    probability is never drawn: `searchsorted(..., right=True)` returns the first index whose
    cumulative mass exceeds u, and a zero-mass token's cumulative mass equals its predecessor's.
    """
    uniforms = torch.stack([torch.rand((), generator=g, device=probs.device) for g in generators])
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def stop_string_end(text: str, stops: Sequence[str]) -> int | None:
    """Index just past the earliest complete occurrence of any stop string in `text`, else None."""
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return min(ends) if ends else None


def request_seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """One seed per request: given as a list, or derived from one int and the request's index."""
    if isinstance(seed, int):
        return [row_seed(seed, i) for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} prompts")
    return seeds
