"""The reward interface the trainer calls, and its construction from ``reward.*``.

Placement (``reward.backend``):

* ``local``: each data-parallel rank scores its own shard in its own process, with the
  encoder on the rank's device (``EmbeddingSimilarityReward``). Nothing to deploy; the
  encoder shares the GPU with training (``reward.offload_between_steps``).
* ``ray``: a pool of reward actors, each with its own GPU or CPUs (``RayRewardPool``),
  shared by every rank; requests from all ranks are batched together in the actors,
  and ``submit``/``result`` let a trainer overlap scoring with other work.
* ``openai``: each rank scores its own shard in process, with the embeddings from an
  OpenAI-compatible embeddings server the team already runs (``EndpointEncoder``); nothing
  of the encoder is loaded into the job.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Protocol, runtime_checkable

import torch

from nemo_rlsr.config import ConfigError, RewardConfig
from nemo_rlsr.config.rules import reward_problems

from .result import RewardResult

__all__ = ["RewardActor", "build_reward_actor"]


@runtime_checkable
class RewardActor(Protocol):
    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> RewardResult:
        """One reward per response, in order; raises rather than return a partial or invalid result."""

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm float32 CPU embeddings [N, D] (held-out evaluation uses them)."""

    def close(self) -> None:
        """Release workers and pools; the run calls it however it ends."""


def pool_name(cfg: RewardConfig) -> str:
    """One name for the actors of one job, the same on every rank: the reward config plus the
    launcher's job ids (torchrun's run id, Slurm's job id), so concurrent jobs never share actors."""
    ident = json.dumps(asdict(cfg), sort_keys=True) + os.environ.get("TORCHELASTIC_RUN_ID", "") + \
        os.environ.get("SLURM_JOB_ID", "")
    return "nemo_rlsr_reward_" + hashlib.sha1(ident.encode()).hexdigest()[:12]


def build_reward_actor(cfg: RewardConfig, device: str, world_size: int = 1) -> RewardActor:
    """The reward of ``reward.backend``; ``device`` is the rank's (used by ``local``)."""
    if cfg.backend in ("local", "openai"):
        from .embedding import EmbeddingSimilarityReward

        return EmbeddingSimilarityReward.from_config(cfg, device)
    if cfg.backend == "ray":
        from .ray_pool import RayRewardPool

        return RayRewardPool(cfg, pool_name(cfg), world_size)
    raise ConfigError("; ".join(reward_problems(cfg)))
