"""What the RLSR loop needs from a rollout engine, independent of which engine runs.

Engines return a `RolloutBatch` in the trainer's own token layout, so that the trainer's logprobs of
the same tokens can be computed without re-tokenising: each row is
`[left pad | prompt | response | right pad]` (left padding keeps every prompt's last token in the
same column; RoPE attention depends only on relative positions, so the shift changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nemo_rlsr.models.policy import TokenBatch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_on_eos: bool = True
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


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

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> RolloutBatch:
        """Sample one response per prompt (repeat a prompt n times for n samples)."""

    def update_weights(self) -> None:
        """Bring the engine's weights up to date with the trainer's (a refit)."""

    def sleep(self) -> None:
        """Release engine memory (KV cache, weights) while the trainer runs."""

    def wake(self) -> None:
        """Re-acquire what `sleep` released before generating."""
