"""Token filters, seeded per-row sampling and stop-string matching: pure functions of tensors/text.

Kept apart from the engine so that each rule can be tested against a hand-computed case and reused
by any engine that samples from full-vocabulary logits.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from nemo_rlsr.generation.interface import SamplingParams


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


def row_generators(seeds: Sequence[int], n: int, device) -> list[torch.Generator]:
    """One generator per sample, group-contiguous (request i's n samples are rows i*n .. i*n+n-1),
    seeded from its request's seed and its index within the request."""
    return [torch.Generator(device=device).manual_seed(row_seed(s, j)) for s in seeds for j in range(n)]


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


def next_tokens(logits: torch.Tensor, params: "SamplingParams", vocab_size: int,
                generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of full-vocabulary logits [rows, padded vocab], and its logprob.

    The rule every engine that samples from our logits follows (the torch sampler, and megatron-core's
    engine through generation/megatron_engine.py), so that the same seeds give the same tokens:
    padded vocabulary ids get probability 0; the logprob is of the temperature-scaled distribution
    before top-k/top-p, which is what the trainer recomputes (models/policy.py divides its logits by
    the same temperature); top-k then top-p filter what is sampled; greedy takes the argmax."""
    from nemo_rlsr.models.gpt import mask_padded_vocab

    logits = mask_padded_vocab(logits.float(), vocab_size, gathered=True) / params.temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        token = logits.argmax(dim=-1)
    else:
        filtered = top_p_filter(top_k_filter(logits, params.top_k), params.top_p)
        token = sample_rows(torch.softmax(filtered, dim=-1), generators)
    return token, logprobs.gather(1, token[:, None]).squeeze(1)


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
