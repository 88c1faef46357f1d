"""The trained reward as a combination of named terms (`reward.terms`, `reward.combine`; docs/rewards.md).

Why in the trainer and not in the reward actor: the actor (in process or a Ray pool) returns the
expensive parts, the cosine and the repetition check, for any backend; the other terms are cheap
(a token count, a regex, a user function) and per-term group normalisation needs the group layout
(`grpo.num_generations` contiguous rows per prompt), which the trainer has. Every term's values are
kept for the step metrics, weight-0 terms included: logging a term without training on it is how a
user watches for reward hacking.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nemo_rlsr.algorithms.grpo import group_advantages
from nemo_rlsr.config import RewardConfig, RewardTermConfig
from nemo_rlsr.config.reward_terms import effective_terms, load_user_function, term_name

from .result import RewardResult

__all__ = ["RewardTerms", "TermValues", "combine_terms", "overlong_penalty"]


def combine_terms(values: torch.Tensor, weights: torch.Tensor, group_size: int | None = None, eps: float = 1e-6,
                  replaced: torch.Tensor | None = None, replacement: torch.Tensor | None = None) -> torch.Tensor:
    """The reward [N] from term values [N, K] and weights [K].

    ``group_size`` None: ``sum_k w_k v_k``. Otherwise each term is first normalised within each group
    of ``group_size`` contiguous rows exactly as GRPO normalises rewards (``group_advantages``:
    ``(v - mean) / (std + eps)``, 0 for a group whose term ties), so that a term with a large
    scale cannot drown the others (GDPO). Terms of weight 0 are left out of the sum. Where
    ``replaced`` [N] is True the reward is ``replacement`` [N] instead.
    """
    if group_size is not None:
        values = torch.stack([group_advantages(values[:, k], group_size, eps) for k in range(values.shape[1])], dim=1)
    active = weights != 0
    total = (values[:, active] * weights[active]).sum(dim=1)
    if replaced is not None:
        total = torch.where(replaced, replacement, total)
    return total


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer_tokens: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to ``max_tokens - buffer_tokens`` tokens, then falling
    linearly to -1 at ``max_tokens``, -1 beyond."""
    start = max_tokens - buffer_tokens
    over = (lengths.float() - start).clamp(min=0)
    return torch.where(lengths > max_tokens, -1.0, -over / max(buffer_tokens, 1)).float()


@dataclass
class TermValues:
    """One step's term values [N, K] (column k is term k of ``names``) and the rows a replacing term
    fired on (None without one)."""

    names: list[str]
    values: torch.Tensor
    replaced: torch.Tensor | None


class RewardTerms:
    """The terms of one run, built once from the config (user functions imported once)."""

    def __init__(self, cfg: RewardConfig, max_new_tokens: int, group_size: int, eps: float) -> None:
        self.terms = effective_terms(cfg)
        self.names = [term_name(t) for t in self.terms]
        self.penalty = float(cfg.repetition_penalty)
        self.max_new_tokens = max_new_tokens
        self.group_size = group_size if cfg.combine == "group_normalized" else None
        self.eps = eps
        self.functions: dict[int, Callable] = {
            k: load_user_function(t.function) for k, t in enumerate(self.terms) if t.kind == "function"}
        self.patterns = {k: re.compile(t.pattern) for k, t in enumerate(self.terms) if t.kind == "regex"}
        replacing = [k for k, t in enumerate(self.terms) if t.replace and t.weight]
        self.replacing = replacing[0] if replacing else None
        # Summed weights: a replacing term enters through `replaced`, not the sum.
        self.weights = torch.tensor([0.0 if k == self.replacing else t.weight for k, t in enumerate(self.terms)],
                                    dtype=torch.float32)

    def _column(self, k: int, term: RewardTermConfig, scores: RewardResult, prompts: list[str],
                responses: list[str], references: list[str], lengths: torch.Tensor, step: int) -> torch.Tensor:
        if term.kind == "cosine":
            return scores.cosine.float()
        if term.kind == "repetition":
            penalized = scores.penalized.bool()
            return torch.where(penalized, torch.full_like(scores.cosine.float(), self.penalty), 0.0)
        if term.kind == "overlong":
            limit = term.max_tokens if term.max_tokens is not None else self.max_new_tokens
            return overlong_penalty(lengths, limit, term.buffer_tokens)
        if term.kind == "regex":
            return torch.tensor([float(self.patterns[k].search(r) is not None) for r in responses])
        fn = self.functions[k]
        out = []
        for i, (p, r, ref) in enumerate(zip(prompts, responses, references)):
            value = fn(prompt=p, response=r, reference=ref, step=step)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"reward term {self.names[k]!r} ({term.function}) returned {value!r} for rollout {i} "
                                 f"(prompt {p!r}): it must return a finite float")
            out.append(float(value))
        return torch.tensor(out, dtype=torch.float32)

    def evaluate(self, scores: RewardResult, prompts: list[str], responses: list[str], references: list[str],
                 lengths: torch.Tensor, step: int) -> TermValues:
        """Every term's value per rollout; ``lengths`` are the responses' token counts, ``step`` the
        step being taken (1-based), both passed to the terms that read them."""
        columns = [self._column(k, t, scores, prompts, responses, references, lengths.cpu(), step)
                   for k, t in enumerate(self.terms)]
        replaced = scores.penalized.bool() if self.replacing is not None else None
        return TermValues(self.names, torch.stack(columns, dim=1), replaced)

    def combine(self, terms: TermValues) -> torch.Tensor:
        """The reward [N] GRPO trains on (rows group-contiguous)."""
        replacement = terms.values[:, self.replacing] if self.replacing is not None else None
        return combine_terms(terms.values, self.weights, self.group_size, self.eps, terms.replaced, replacement)
