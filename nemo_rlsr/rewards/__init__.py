"""RLSR rewards: embedding similarity to the human reference, with a repetition penalty."""

from .embedding import EmbeddingSimilarityReward, RewardResult, bundled_minilm_path
from .repetition import RepetitionPenalty

__all__ = ["EmbeddingSimilarityReward", "RepetitionPenalty", "RewardResult", "bundled_minilm_path"]
