"""``reward.backend: ray``: a pool of Ray reward actors shared by every trainer rank.

Why a pool: at 1024 prompts x 8 rollouts a step, 8,192 responses are embedded and checked
each step; a large encoder (Qwen3-Embedding-8B) needs GPUs of its own for that, and
the checks want CPU cores, neither of which the training ranks can spare.

How it behaves:

* every rank's client splits its responses into contiguous shards balanced by
  characters, one per actor, and sends them without waiting (``submit``); ``result``
  collects them in order. ``score`` is the two together.
* each actor is an asyncio actor: requests that arrive while it is busy (from all ranks)
  are queued and scored together as one batch, so the encoder sees large, length-sorted
  batches however the step is split over ranks.
* an actor that dies (OOM, a lost node, a kill) is restarted by Ray and the requests it
  held are retried on the new one (``max_restarts`` / ``max_task_retries``), so a death
  costs time, never a reward. After ``reward.ray_max_restarts`` deaths, or after
  ``reward.ray_timeout_s``, ``result`` raises: no rollout is ever returned unscored, and
  every result is range-checked (RewardResult.check).

Ray is an optional dependency (``pip install nemo-rlsr[ray]``), imported only here.
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass

import torch

from nemo_rlsr.config import ConfigError, RewardConfig
from nemo_rlsr.distributed.local_ray import NAMESPACE, connect_ray

from .result import RewardResult

__all__ = ["RayRewardPool", "PendingScore", "NAMESPACE"]



class _Worker:
    """The body of one reward actor: batches concurrent requests into one scoring pass."""

    def __init__(self, cfg: RewardConfig) -> None:
        from .embedding import EmbeddingSimilarityReward

        torch.set_num_threads(max(1, int(cfg.ray_cpus_per_actor)))
        device = "cuda" if cfg.ray_gpus_per_actor > 0 else "cpu"
        self.reward = EmbeddingSimilarityReward.from_config(cfg, device)
        self.pending: list[tuple[list[str], list[str], list[str], asyncio.Future]] = []
        self.busy = 0  # responses in the batch being scored now
        self.draining = False

    async def score(self, prompts: list[str], responses: list[str], references: list[str]):
        """(RewardResult, pid): the pid lets clients count restarts."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((prompts, responses, references, future))
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future, os.getpid()

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                columns = [[text for request in batch for text in request[c]] for c in range(3)]
                self.busy = len(columns[1])
                try:
                    result = await asyncio.to_thread(self.reward.score, *columns)
                except Exception as exc:  # the callers get the error, with its traceback
                    for *_, future in batch:
                        future.set_exception(exc)
                    continue
                finally:
                    self.busy = 0
                start = 0
                for _, responses, _, future in batch:
                    future.set_result(result.slice(start, start + len(responses)))
                    start += len(responses)
        finally:
            self.draining = False

    async def embed(self, texts: list[str]) -> torch.Tensor:
        return await asyncio.to_thread(self.reward.embed, texts)

    async def status(self) -> tuple[int, int]:
        """(pid, responses being scored now)."""
        return os.getpid(), self.busy


@dataclass
class PendingScore:
    """A submitted request: one Ray object ref per non-empty shard, in response order."""

    refs: list
    actors: list[int]
    count: int


def _shard_bounds(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges, at most ``parts``, with about equal total size."""
    total = sum(sizes) or 1
    bounds, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc * parts >= total * (len(bounds) + 1) and len(bounds) < parts - 1:
            bounds.append((start, i + 1))
            start = i + 1
    if start < len(sizes):
        bounds.append((start, len(sizes)))
    return bounds


class RayRewardPool:
    """Client of ``reward.ray_num_actors`` named reward actors (created by the first rank to ask)."""

    def __init__(self, cfg: RewardConfig, name: str, world_size: int = 1) -> None:
        import ray

        self.cfg = cfg
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized() and address is None and world_size > 1:  # where the job runs: checked here
            raise ConfigError(
                "reward.backend=ray with several ranks needs one Ray cluster for all of them: set "
                "reward.ray_address or RAY_ADDRESS (slurm/launch.sh starts one), or `ray start --head`"
            )
        self._started_ray = connect_ray(address, math.ceil(cfg.ray_num_actors * cfg.ray_cpus_per_actor))
        actor_class = ray.remote(_Worker)
        self.actors = [
            actor_class.options(
                name=f"{name}_{i}", namespace=NAMESPACE, get_if_exists=True,
                num_cpus=cfg.ray_cpus_per_actor, num_gpus=cfg.ray_gpus_per_actor,
                max_restarts=cfg.ray_max_restarts, max_task_retries=cfg.ray_max_restarts,
            ).remote(cfg)
            for i in range(cfg.ray_num_actors)
        ]
        self._pids: dict[int, int] = {}
        self.restarts = 0  # actor restarts this client has seen (a changed pid)

    def pids(self) -> list[int]:
        """Each actor's process id (waits for the actors to be up)."""
        import ray

        statuses = ray.get([a.status.remote() for a in self.actors], timeout=self.cfg.ray_timeout_s)
        for i, (pid, _) in enumerate(statuses):
            self._observe(i, pid)
        return [pid for pid, _ in statuses]

    def busy(self) -> list[int]:
        """Responses each actor is scoring right now."""
        import ray

        return [busy for _, busy in ray.get([a.status.remote() for a in self.actors], timeout=self.cfg.ray_timeout_s)]

    def _observe(self, actor: int, pid: int) -> None:
        if self._pids.get(actor, pid) != pid:
            self.restarts += 1
        self._pids[actor] = pid

    def submit(self, prompts: list[str], responses: list[str], references: list[str]) -> PendingScore:
        """Send the request to the actors and return at once."""
        n = len(responses)
        if len(prompts) != n or len(references) != n:
            raise ValueError(f"length mismatch: {len(prompts)} prompts, {n} responses, {len(references)} references")
        bounds = _shard_bounds([len(r) + 1 for r in responses], len(self.actors))
        refs = [self.actors[i].score.remote(prompts[a:b], responses[a:b], references[a:b])
                for i, (a, b) in enumerate(bounds)]
        return PendingScore(refs, list(range(len(bounds))), n)

    def result(self, pending: PendingScore) -> RewardResult:
        """Wait for a submitted request: every response's reward, or an exception."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            parts = ray.get(pending.refs, timeout=self.cfg.ray_timeout_s)
        except RayActorError as exc:
            raise RuntimeError(
                f"a reward actor died more than reward.ray_max_restarts={self.cfg.ray_max_restarts} times; "
                f"{pending.count} responses not scored"
            ) from exc
        except GetTimeoutError as exc:
            raise RuntimeError(f"reward actors did not answer within reward.ray_timeout_s="
                               f"{self.cfg.ray_timeout_s}; {pending.count} responses not scored") from exc
        for actor, (_, pid) in zip(pending.actors, parts):
            self._observe(actor, pid)
        result = RewardResult.cat([part for part, _ in parts])
        if len(result) != pending.count:
            raise RuntimeError(f"reward actors returned {len(result)} rewards for {pending.count} responses")
        return result.check()

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> RewardResult:
        return self.result(self.submit(prompts, responses, references))

    def embed(self, texts: list[str]) -> torch.Tensor:
        import ray

        bounds = _shard_bounds([len(t) + 1 for t in texts], len(self.actors))
        parts = ray.get([self.actors[i].embed.remote(texts[a:b]) for i, (a, b) in enumerate(bounds)],
                        timeout=self.cfg.ray_timeout_s)
        return torch.cat(parts) if parts else torch.zeros(0, 0)

    def close(self) -> None:
        """Stop the actors and the Ray instance this client started itself (a Ray cluster someone
        else started, and actors other ranks use, are left alone: they end with their owner)."""
        import ray

        if self._started_ray:
            ray.shutdown()  # stops the local Ray and with it the actors
