"""The trainer with the Ray reward backend and the chunk policy, through the real CLI: the reward
diagnostics land in the per-step metrics."""

from __future__ import annotations

import json

import pytest

from cli_runner import cli

pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_backend_trainer_logs_reward_diagnostics(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain.steps=10", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.micro_batch_size=8",
            "rollout.max_new_tokens=12", "trainer.progress_bar=false", "trainer.steps=2", "trainer.heldout_eval=false",
            "reward.backend=ray", "reward.ray_num_actors=1", "reward.long_response=chunk", f"trainer.output_dir={out}"]
    cli("train", "rlsr_tiny.yaml", args, timeout=300)  # a Ray of its own: cli_runner drops RAY_ADDRESS
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert sum(r[f"reward/cos_hist_{k}"] for k in range(10)) == 16  # 4 prompts x 4 samples
        for key in ("reward/fraction_empty", "reward/length_corr", "reward/encoder_truncated",
                    "reward/encoder_chunked", "reward/repeat_len_mean", "reward/repeat_len_max"):
            assert key in r, key
        assert -1.0 <= r["reward/length_corr"] <= 1.0 and r["reward/repeat_len_max"] > 0
