"""What one reward call returns, per rollout, and the check that makes bad rewards errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["RewardResult", "RewardRangeError"]


class RewardRangeError(ValueError):
    """A reward is NaN/Inf or outside [-1, 1]: a broken encoder or a mixed-up answer, never a number
    to train on."""


@dataclass
class RewardResult:
    """Per-rollout outputs of one ``score`` call (all shape [N], on CPU).

    Besides the reward, the fields the reward-hacking diagnostics need (diagnostics.py):
    a policy can learn to game the encoder (hit the cosine with empty or truncated text)
    or the penalty, and a rising mean reward alone does not show it.
    """

    rewards: torch.Tensor  # float32: cosine, or the penalty where penalized
    cosine: torch.Tensor  # float32, in [-1, 1]; kept for logging even when penalized
    penalized: torch.Tensor  # bool
    cut: torch.Tensor  # bool: the encoder saw only the first window (long_response=truncate)
    chunked: torch.Tensor  # bool: embedded as the mean of several windows (long_response=chunk)
    empty: torch.Tensor  # bool: the response is empty or whitespace
    repeat_length: torch.Tensor  # int64: exact repetition measure, -1 where not measured

    @classmethod
    def empty_batch(cls) -> "RewardResult":
        f, b = torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool)
        return cls(f, f.clone(), b, b.clone(), b.clone(), b.clone(), torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.rewards)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RewardResult":
        """A result with ``fn`` applied to every field (e.g. gathering over DP ranks)."""
        return RewardResult(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def slice(self, start: int, stop: int) -> "RewardResult":
        return self.map(lambda t: t[start:stop])

    @classmethod
    def cat(cls, parts: list["RewardResult"]) -> "RewardResult":
        if not parts:
            return cls.empty_batch()
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)})

    def check(self, prompts: Sequence[str] | None = None) -> "RewardResult":
        """Raise RewardRangeError naming the first bad index (and its prompt, when given) if any
        reward or cosine is not a finite number in [-1, 1]; return self otherwise."""
        for name in ("rewards", "cosine"):
            values = getattr(self, name)
            bad = (~torch.isfinite(values) | (values < -1.0) | (values > 1.0)).nonzero().flatten().tolist()
            if bad:
                where = f" (prompt {prompts[bad[0]]!r})" if prompts is not None else ""
                raise RewardRangeError(
                    f"{name}[{bad[0]}] = {float(values[bad[0]])}{where} is not a finite number in [-1, 1] "
                    f"({len(bad)} of {len(values)} bad; indices {bad[:10]})"
                )
        return self
