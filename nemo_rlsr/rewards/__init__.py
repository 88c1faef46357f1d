"""RLSR rewards: embedding similarity to the human reference, with a repetition penalty, and more terms.

    actor.py              RewardActor protocol; build_reward_actor(reward config) -> local, Ray or endpoint
    embedding.py          EmbeddingSimilarityReward: the in-process actor (reference cache, checks)
    encoders.py           SentenceEncoder: SB / Qwen-EM through sentence-transformers, truncate/chunk
    endpoint.py           EndpointEncoder: the same contract over an OpenAI-compatible /embeddings server
    batching.py           length-sorted batches under a token budget; padding
    repetition.py         the penalty rule and its linear-time substring tests
    repetition_runner.py  the checks beside the encoder, optionally in a process pool
    ray_pool.py           RayRewardPool: Ray actors shared by all ranks, restart + retry
    result.py             RewardResult (per-rollout outputs) and its range check
    diagnostics.py        per-step reward-hacking metrics
    overlap.py            scoring a step's chunks in a background thread while the next chunk generates
    replica.py            one score per data-parallel replica, broadcast to its TP/PP/CP ranks
    terms.py              the trained reward as named terms (reward.terms), weighted or group-normalised
    random_qwen.py        a random-weight Qwen3-Embedding-shaped folder, for tests and benchmarks
"""

from .actor import RewardActor, build_reward_actor
from .embedding import EmbeddingSimilarityReward
from .encoders import SentenceEncoder, bundled_minilm_path
from .repetition import RepetitionPenalty
from .result import RewardRangeError, RewardResult

__all__ = [
    "EmbeddingSimilarityReward",
    "RepetitionPenalty",
    "RewardActor",
    "RewardRangeError",
    "RewardResult",
    "SentenceEncoder",
    "build_reward_actor",
    "bundled_minilm_path",
]
