"""The Ray reward pool for real: a local Ray on loopback, 2 CPU actors with the bundled MiniLM,
one of them SIGKILLed while it is scoring. Every reward must still arrive, equal to the
in-process result."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time

import pytest
import torch

from nemo_rlsr.config import RewardConfig
from nemo_rlsr.rewards import EmbeddingSimilarityReward, RewardActor, RewardResult, build_reward_actor

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

WORDS = ("the dog barks loudly at night while the market falls sharply and interest rates rise "
         "after inflation data surprised traders who sold shares of banks").split()


def _rollouts(n: int, seed: int = 0):
    """A realistic mix: empty, short, long (past MiniLM's 256-token window) and looping responses,
    8 rollouts per reference."""
    rng = random.Random(seed)
    responses = []
    for i in range(n):
        kind = i % 8
        if kind == 0:
            responses.append("")
        elif kind == 1:
            responses.append("I will keep saying this again. " * 8)  # penalized loop
        else:
            responses.append(" ".join(rng.choice(WORDS) for _ in range(rng.choice([5, 40, 120, 400]))))
    references = [f"Reference answer {i // 8}: " + " ".join(rng.choice(WORDS) for _ in range(30)) for i in range(n)]
    return [f"prompt {i // 8}" for i in range(n)], responses, references


def test_pool_survives_an_actor_killed_mid_batch():
    cfg = RewardConfig(backend="ray", ray_num_actors=2, ray_cpus_per_actor=1, ray_max_restarts=2, ray_timeout_s=80)
    prompts, responses, references = _rollouts(64)
    pool = build_reward_actor(cfg, "cpu")  # actors start in the background
    try:
        # In process, every response's exact repetition measure (the pool logs only the first k of each
        # actor batch, and which responses those are depends on how the requests were split and retried).
        local = EmbeddingSimilarityReward.from_config(dataclasses.replace(cfg, repetition_measure_first=64), "cpu")
        assert isinstance(pool, RewardActor) and isinstance(local, RewardActor)
        expected = local.score(prompts, responses, references)
        pids = pool.pids()
        # Two ranks' requests in flight at once; each is split over both actors.
        rank0 = pool.submit(prompts[:32], responses[:32], references[:32])
        rank1 = pool.submit(prompts[32:], responses[32:], references[32:])
        deadline = time.monotonic() + 30
        while pool.busy()[0] == 0:
            assert time.monotonic() < deadline, "actor 0 never started scoring"
        os.kill(pids[0], signal.SIGKILL)  # mid-batch: the actor reported responses in progress
        got = RewardResult.cat([pool.result(rank0), pool.result(rank1)])

        assert pool.restarts >= 1 and pool.pids()[0] != pids[0]
        assert len(got) == len(responses)
        torch.testing.assert_close(got.rewards, expected.rewards, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.cosine, expected.cosine, atol=1e-5, rtol=0)
        for name in ("penalized", "cut", "chunked", "empty"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name
        assert got.penalized.any() and got.cut.any() and got.empty.any()
        measured = got.repeat_length >= 0  # each actor batch measures its own first k
        assert measured.any() and bool((expected.repeat_length >= 0).all())
        assert torch.equal(got.repeat_length[measured], expected.repeat_length[measured])
        torch.testing.assert_close(pool.embed(responses[:5]), local.embed(responses[:5]), atol=1e-5, rtol=0)
        local.close()
    finally:
        pool.close()
