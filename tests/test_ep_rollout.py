"""The torch rollout sampler at expert parallelism 2: each rank samples its own prompts in lockstep.

Reference: the same weights at EP=1, where one process generates each rank's prompt set alone (no
collective). At EP=2 (2 gloo ranks, DP=2, allgather dispatcher) the ranks hold different prompt
counts and lengths, and one of them runs out of rows (EOS) long before the other: its MoE layers
must keep stepping with filler rows. Also the real trainer path: `nemo-rlsr train` at EP=2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed_helpers import run_workers
from test_hf_moe import MOE_OVERRIDES

WORKER = Path(__file__).resolve().parent / "ep_rollout_worker.py"


@pytest.mark.slow
def test_ep2_rollouts_equal_single_process_rollouts(tmp_path):
    results = run_workers("rollout", tmp_path, nprocs=2, timeout_s=240.0, worker=WORKER)
    assert sorted(r["dp_rank"] for r in results) == [0, 1]
    for result in results:
        assert result["lockstep_ep2"] and not result["lockstep_ep1"] and not result["lockstep_tp2_ep2"]
        for case in ("greedy", "sampled"):
            reference = results[0][f"{case}_ep1"][result["dp_rank"]]  # rank 0's single-process run
            got = result[f"{case}_ep2"]
            assert got["tokens"] == reference["tokens"], case
            assert got["truncated"] == reference["truncated"], case
            for mine, theirs in zip(got["logprobs"], reference["logprobs"]):
                torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    # the setup really exercises filler rows: rows leave at different steps; in the greedy case rank 0
    # (one prompt) has no row left after step 1 while rank 1 goes on, so it stepped with fillers only
    for case in ("greedy", "sampled"):
        eos = results[0][f"{case}_eos"]
        short, long = sorted(results[0][f"{case}_ep1"], key=lambda r: len(r["tokens"]))
        assert short["tokens"][0] == short["tokens"][0][:1] + [eos], case
        assert max(len(tokens) for tokens in long["tokens"]) > 2, case
    early = next(r for r in results if r["dp_rank"] == 0)["greedy_ep2"]["tokens"]
    assert len(early) == 1 and len(early[0]) == 2


def test_torch_engine_accepts_expert_parallelism_megatron_engine_refuses_it():
    from nemo_rlsr.config import RLSRConfig
    from nemo_rlsr.generation.factory import engine_problems

    cfg = RLSRConfig()
    cfg.parallel.expert_parallel = 2
    assert engine_problems(cfg, cuda=False, trtllm_importable=False) == []
    cfg.rollout.engine = "megatron"
    assert any("expert_parallel=2 is not built" in p for p in engine_problems(cfg, cuda=True, trtllm_importable=False))


@pytest.mark.slow
def test_rlsr_cli_runs_with_expert_parallelism(tmp_path):
    """`nemo-rlsr train` (torch rollout engine) with an MoE policy at EP=2 on 2 gloo ranks: every
    rank samples its own prompts, and the run completes its steps."""
    from cli_runner import cli

    cli("train", "rlsr_tiny.yaml", ["pretrain.steps=2", "pretrain.batch_size=8", "grpo.prompts_per_step=4",
                                    "grpo.num_generations=2", "grpo.micro_batch_size=4", "rollout.max_new_tokens=8",
                                    "trainer.steps=2", "trainer.heldout_eval=false", "trainer.progress_bar=false",
                                    f"trainer.output_dir={tmp_path}", "parallel.expert_parallel=2", *MOE_OVERRIDES],
        nprocs=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(-1.0 <= r["reward/mean"] <= 1.0 for r in records)
