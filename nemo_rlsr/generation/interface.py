"""What the RLSR loop needs from a rollout engine, independent of which engine runs.

Engines return a `RolloutBatch` in the trainer's own token layout, so that the trainer's logprobs of
the same tokens can be computed without re-tokenising: each row is
`[left pad | prompt | response | right pad]` (left padding keeps every prompt's last token in the
same column; RoPE attention depends only on relative positions, so the shift changes nothing).
The trainer closes its engine however a run ends (docs/design.md: interfaces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from nemo_rlsr.config.rules import sampling_problems
from nemo_rlsr.models.policy import TokenBatch


@dataclass(frozen=True)
class SamplingParams:
    """What every engine honours. `top_k: 0` keeps all tokens. `stop`: strings that end a response
    once its decoded text contains one (the response keeps the token that completed it, as it keeps
    EOS). `n`: samples per prompt, returned group-contiguously (prompt i's samples are rows
    i*n .. i*n+n-1); engines that can share the prompt's KV cache among the n samples do.
    Engine logprobs are those of the temperature-scaled distribution before top-k/top-p filtering,
    which is what the trainer recomputes."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_on_eos: bool = True
    greedy: bool = False
    stop: tuple[str, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        problems = sampling_problems(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.stop, self.n)
        if problems:
            raise ValueError("; ".join(problems))

@dataclass
class RolloutBatch:
    """N sampled sequences. Per-token tensors are [N, T] and aligned with `TokenBatch.targets`
    (column t describes the token at t+1), so `response_mask` is directly a loss mask."""

    input_ids: torch.Tensor
    valid: torch.Tensor
    response_mask: torch.Tensor
    engine_logprobs: torch.Tensor
    response_ids: list[list[int]]
    truncated: torch.Tensor

    def to_token_batch(self, **extras: torch.Tensor) -> TokenBatch:
        return TokenBatch(self.input_ids, self.valid, self.response_mask.float(), dict(extras))


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seed: int | Sequence[int]) -> RolloutBatch:
        """`params.n` responses per prompt, group-contiguous. `seed`: one per prompt, or one int
        from which each prompt's seed is derived by its index; the same (prompt, seed) gives the
        same samples whatever else is in the batch (up to the engine's batch numerics)."""

    def update_weights(self) -> dict[str, float]:
        """Bring the engine's weights up to date with the trainer's (a refit); returns the refit's
        step metrics (refit/seconds, refit/gib, refit/buckets), empty when nothing is copied."""

    def sleep(self) -> None:
        """Release engine memory (KV cache, weights) while the trainer runs."""

    def wake(self) -> None:
        """Re-acquire what `sleep` released before generating."""

    def close(self) -> None:
        """Release what the engine holds for good (its workers); the run calls it however it ends."""
