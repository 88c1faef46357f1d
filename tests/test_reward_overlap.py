"""Scoring overlapped with generation (reward.overlap_chunks): the same rollouts and rewards as one
unchunked call, a failed chunk fails the step without leaving a scoring thread behind, and the
config rules around it. The reward is the bundled MiniLM; the engine our torch sampler."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from cli_runner import cli
from nemo_rlsr.config import load_config
from nemo_rlsr.rewards import EmbeddingSimilarityReward, RewardResult
from nemo_rlsr.rewards.overlap import OverlappedScoring, chunk_bounds

REPO = Path(__file__).resolve().parents[1]


class FailsOnCall(EmbeddingSimilarityReward):
    """The real reward that raises on its `fail_on`-th score call (0-based): a failure injected
    into one chunk, the others scored for real."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fail_on, self.calls = fail_on, 0

    def score(self, prompts, responses, references) -> RewardResult:
        call, self.calls = self.calls, self.calls + 1
        if call == self.fail_on:
            raise RuntimeError(f"injected failure in scoring call {call}")
        return super().score(prompts, responses, references)


def scoring_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nemo_rlsr_scoring")]


def test_chunk_bounds_cover_the_prompts_in_order_with_at_most_one_chunk_per_prompt():
    assert chunk_bounds(4, 1) == [(0, 4)]
    assert chunk_bounds(5, 2) == [(0, 3), (3, 5)]
    assert chunk_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert chunk_bounds(0, 2) == [(0, 0)]


def test_joined_chunks_equal_one_call_and_a_failed_chunk_raises_after_the_rest_ended():
    prompts = ["p"] * 6
    responses = ["a cat sat", "dogs run fast", "", "the sun is a star", "water boils", "x y z"]
    references = ["a cat", "dogs", "empty", "the sun", "boiling water", "letters"]
    reward = EmbeddingSimilarityReward()
    whole = reward.score(prompts, responses, references)
    with OverlappedScoring(reward) as scoring:
        for a, b in [(0, 2), (2, 5), (5, 6)]:
            scoring.submit(prompts[a:b], responses[a:b], references[a:b])
        joined = scoring.join()
    for name in ("rewards", "cosine", "penalized", "empty"):
        assert torch.allclose(getattr(joined, name).float(), getattr(whole, name).float(), atol=1e-6), name
    assert not scoring_threads()

    failing = FailsOnCall(fail_on=1)
    with pytest.raises(RuntimeError, match="injected failure in scoring call 1"):
        with OverlappedScoring(failing) as scoring:
            for a, b in [(0, 2), (2, 4), (4, 6)]:
                scoring.submit(prompts[a:b], responses[a:b], references[a:b])
            scoring.join()
    assert not scoring_threads()  # the context's exit ended the thread
    assert failing.calls in (2, 3)  # the third chunk was cancelled or had already run; nothing runs now


def test_hidden_seconds_is_the_scoring_time_before_generation_ended():
    reward = EmbeddingSimilarityReward()
    with OverlappedScoring(reward) as scoring:
        scoring.submit(["p"] * 4, ["some words"] * 4, ["a reference"] * 4)
        scoring.join()
    (start, end), = scoring.intervals
    assert scoring.hidden_seconds(end + 1.0) == pytest.approx(end - start)
    assert scoring.hidden_seconds((start + end) / 2) == pytest.approx((end - start) / 2)
    assert scoring.hidden_seconds(start) == 0.0


def test_overlap_chunks_must_be_at_least_one_and_at_most_the_prompts_per_step():
    from nemo_rlsr.config.rules import config_problems
    from nemo_rlsr.generation.factory import engine_problems

    def problems(*overrides: str) -> str:
        return "; ".join(config_problems(load_config(REPO / "conf/rlsr_tiny.yaml", list(overrides)), "rlsr"))

    assert "overlap_chunks" not in problems("reward.overlap_chunks=4")
    assert "reward.overlap_chunks must be >= 1, got 0" in problems("reward.overlap_chunks=0")
    assert "reward.overlap_chunks=17 exceeds grpo.prompts_per_step=16" in problems("reward.overlap_chunks=17")
    trtllm = load_config(REPO / "conf/rlsr_tiny.yaml", ["rollout.engine=trtllm", "reward.overlap_chunks=2"])
    assert any("reward.overlap_chunks=2 with rollout.engine=trtllm is refused" in p
               for p in engine_problems(trtllm, cuda=True, trtllm_importable=True))
    trtllm.reward.overlap_chunks = 1
    assert not any("overlap_chunks" in p for p in engine_problems(trtllm, cuda=True, trtllm_importable=True))


@pytest.fixture(scope="module")
def trainer(single_rank, tmp_path_factory):
    from nemo_rlsr.trainer.rlsr import RLSRTrainer

    cfg = load_config(REPO / "conf" / "rlsr_tiny.yaml", [
        "trainer.progress_bar=false", "trainer.heldout_eval=false",
        f"trainer.output_dir={tmp_path_factory.mktemp('overlap')}", "pretrain.steps=10", "pretrain.batch_size=8",
        "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.micro_batch_size=8",
        "rollout.max_new_tokens=10", "rollout.temperature=1.0", "trainer.steps=1"])
    run = RLSRTrainer(cfg)
    run.setup()
    yield run
    run.close()


def rollout(trainer, chunks: int, rows: list[int]):
    trainer.cfg.reward.overlap_chunks = chunks
    timings: dict = {}
    rollouts, texts, _, scores = trainer._rollout(trainer.train, rows, seed=77, timings=timings)
    return rollouts, texts, scores, timings


def test_chunked_rollouts_and_rewards_equal_the_unchunked_ones(trainer):
    # prompts of different lengths, so that chunks are padded to different widths
    lengths = [len(ids) for ids in trainer.train.token_ids]
    rows = sorted(range(len(lengths)), key=lambda i: lengths[i])
    rows = [rows[0], rows[-1], rows[len(rows) // 2], rows[1]]
    assert len({lengths[i] for i in rows}) > 1
    whole, texts, scores, timings = rollout(trainer, 1, rows)
    assert timings["reward/scored_rows"] == len(texts) == 16
    for chunks in (2, 4):
        part, part_texts, part_scores, part_timings = rollout(trainer, chunks, rows)
        assert part_texts == texts and part.response_ids == whole.response_ids
        for name in ("input_ids", "valid", "response_mask", "truncated"):
            assert torch.equal(getattr(part, name), getattr(whole, name)), (chunks, name)
        # the same tokens; their logprobs up to the float rounding of another left-pad width in the
        # prefill (generation/torch_sampler.py: seeds)
        difference = (part.engine_logprobs - whole.engine_logprobs).abs().max()
        print(f"chunks={chunks}: largest engine logprob difference {float(difference):.2e}")
        assert difference < 1e-5
        # the same texts; their rewards up to the rounding of other encoder batches
        for name in ("penalized", "empty", "cut"):
            assert torch.equal(getattr(part_scores, name), getattr(scores, name)), (chunks, name)
        difference = (part_scores.rewards - scores.rewards).abs().max()
        print(f"chunks={chunks}: largest reward difference {float(difference):.2e}")
        assert difference < 1e-6 and torch.allclose(part_scores.cosine, scores.cosine, atol=1e-6, rtol=0)
        assert part_timings["reward/scored_rows"] == 16
        assert part_timings["time/reward_overlapped"] > 0.0  # chunk 1 was scored while chunk 2 generated

    # Negative control: chunks that each restart from the step's seed (instead of keeping every
    # prompt's own seed) sample other tokens, which the comparison above would catch.
    naive = trainer.engine.generate([trainer.train.token_ids[i] for i in rows[2:]], trainer.sampling, 77)
    assert naive.response_ids != whole.response_ids[2 * 4:]


def test_a_failed_chunk_fails_the_rollout_and_leaves_no_scoring_thread(trainer):
    real = trainer.reward
    trainer.reward = FailsOnCall(fail_on=1)
    try:
        with pytest.raises(RuntimeError, match="injected failure in scoring call 1"):
            rollout(trainer, 2, [0, 1, 2, 3])
        assert trainer.reward.calls == 2
    finally:
        trainer.reward.close()
        trainer.reward = real
    time.sleep(0.05)
    assert not scoring_threads()


TINY_RUN = ["pretrain.steps=20", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.micro_batch_size=8",
            "rollout.max_new_tokens=12", "trainer.progress_bar=false", "trainer.heldout_eval=false", "trainer.steps=1"]


def first_step(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
def test_tp2_scores_each_rollout_once_and_gets_the_tp1_rewards(tmp_path):
    """Both TP ranks of the replica hold the same 16 rollouts: one of them scores (16 rows counted
    over the world, not 32), the other receives the result; the rewards are the TP=1 run's."""
    cli("train", "rlsr_tiny.yaml", TINY_RUN + [f"trainer.output_dir={tmp_path / 'tp1'}"])
    cli("train", "rlsr_tiny.yaml", TINY_RUN + ["parallel.tensor_parallel=2", "reward.overlap_chunks=2",
                                               f"trainer.output_dir={tmp_path / 'tp2'}"], nprocs=2)
    one, two = first_step(tmp_path / "tp1"), first_step(tmp_path / "tp2")
    assert one["reward/scored_rows"] == 16
    assert two["reward/scored_rows"] == 16
    for key in ("reward/mean", "reward/std", "reward/min", "reward/max"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key


@pytest.mark.slow
def test_overlap_benchmark_prints_both_shares_and_their_ratio():
    from cli_runner import run_python

    result = run_python(["benchmarks/reward_overlap_bench.py", "--chunks", "2", "--steps", "1",
                         "--set", "grpo.prompts_per_step=4", "--set", "grpo.num_generations=4",
                         "--set", "grpo.micro_batch_size=8", "--set", "rollout.max_new_tokens=8"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "overlap_chunks=1: reward share" in result.stdout and "overlap_chunks=2: reward share" in result.stdout
    assert "reward share, overlap_chunks=2 / overlap_chunks=1:" in result.stdout
