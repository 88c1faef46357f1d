"""Context parallelism on megatron's local spec (models/context_parallel.py), on real gloo ranks.

The attention module is checked against plain full attention written here; the policy at CP=2
against the same weights at CP=1 (logprobs, packed rows, one optimizer step, generation, a dist
checkpoint saved at CP=2 and loaded at CP=1); the CLI at `parallel.context_parallel=2` end to end.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cp_worker import B, DIM, GROUPS, HEADS, T, attention_inputs  # noqa: E402
from distributed_helpers import run_workers  # noqa: E402

WORKER = Path(__file__).parent / "cp_worker.py"


def test_cp_positions_are_megatrons_load_balanced_chunks():
    from nemo_rlsr.models.context_parallel import cp_positions

    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert sorted(torch.cat([cp_positions(24, 3, r) for r in range(3)]).tolist()) == list(range(24))
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel"):
        cp_positions(6, 2, 0)


def test_rope_slices_its_table_in_the_same_order():
    """megatron's RoPE picks each CP rank's rows itself: they must be the positions we split."""
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    from nemo_rlsr.distributed import cpu_compat
    from nemo_rlsr.models.context_parallel import cp_positions

    cpu_compat.enable()  # megatron pins a CUDA index tensor

    class Group:  # the two methods megatron reads
        def __init__(self, rank):
            self._rank = rank

        def size(self):
            return 2

        def rank(self):
            return self._rank

    table = torch.arange(16.0)[:, None, None, None]
    for rank in range(2):
        rows = get_pos_emb_on_this_cp_rank(table, 0, Group(rank)).flatten()
        assert rows.tolist() == cp_positions(16, 2, rank).float().tolist()


def test_throughput_counts_this_ranks_share_of_the_tokens():
    from nemo_rlsr.distributed.parallel import ParallelContext
    from nemo_rlsr.trainer.throughput import step_throughput

    def ctx(cp):
        return ParallelContext(rank=0, world_size=cp, tp=1, pp=1, dp=1, dp_rank=0, device=torch.device("cpu"), cp=cp)

    one, two = (step_throughput(1000, 10**6, 2.0, ctx(cp)) for cp in (1, 2))
    assert two["perf/tokens_per_s_per_rank"] == one["perf/tokens_per_s_per_rank"] / 2 == 250
    # generation (2 of the 12 FLOPs per parameter and token) is whole rows on every CP rank
    assert two["perf/tflops_per_rank"] == pytest.approx(one["perf/tflops_per_rank"] * (2 + 10 / 2) / 12)


def reference_attention(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain softmax attention over the whole sequence (GQA by repeating k/v heads), and the
    gradients of sum(output * grad) with respect to q, k, v."""
    from nemo_rlsr.models.policy import attention_mask

    q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))
    rep = HEADS // GROUPS
    kk, vv = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kk) / math.sqrt(DIM)
    scores = scores.masked_fill(attention_mask(x["valid"]), -10000.0)  # megatron's masked value
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vv).reshape(T, B, HEADS * DIM)
    (out * x["grad"]).sum().backward()
    return {"output": out.detach(), "grad_q": q.grad, "grad_k": k.grad, "grad_v": v.grad}


@pytest.mark.slow
def test_attention_matches_full_attention(tmp_path):
    expected = reference_attention(attention_inputs())
    for rank in run_workers("attention", tmp_path, nprocs=2, worker=WORKER):
        for name, value in expected.items():
            torch.testing.assert_close(rank[name], value, rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def policy_runs(tmp_path_factory):
    return run_workers("policy", tmp_path_factory.mktemp("cp"), nprocs=2, timeout_s=240, worker=WORKER)


@pytest.mark.slow
def test_cp2_matches_cp1(policy_runs):
    assert_cp2_matches_cp1(policy_runs)


@pytest.mark.slow
def test_checkpoint_saved_at_cp2_loads_at_cp1(policy_runs):
    assert_reloaded(policy_runs)


@pytest.mark.slow
def test_tp2_cp2_matches_tp2_on_four_ranks(tmp_path):
    """TP=2 x CP=2 against TP=2 x DP=2 with the distributed optimizer (its state sharded over DP x CP),
    whose checkpoint reloads at CP=1 too."""
    runs = run_workers("tp2_policy", tmp_path, nprocs=4, timeout_s=300, worker=WORKER)
    assert_cp2_matches_cp1(runs)
    assert_reloaded(runs)


@pytest.mark.slow
def test_moe_model_at_cp2_matches_cp1(tmp_path):
    assert_cp2_matches_cp1(run_workers("moe_policy", tmp_path, nprocs=2, timeout_s=240, worker=WORKER))


def assert_cp2_matches_cp1(runs: list[dict]) -> None:
    for rank in runs:
        one, two = rank["cp1"], rank["cp2"]
        assert (one["dp"], two["dp"]) == (2, 1)  # DP excludes CP
        assert (one["sequence_multiple"], two["sequence_multiple"]) == (1, 4)
        assert two["context_parallel_size"] == 2  # restored after generation
        assert one["responses"] == two["responses"]
        torch.testing.assert_close(two["engine_logprobs"], one["engine_logprobs"], rtol=0, atol=1e-5)
        for key in ("logprobs", "packed_logprobs", "logprobs_after"):
            assert two[key].shape == one[key].shape
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
        assert one["logprobs_after"].sub(one["logprobs"]).abs().max() > 1e-3  # the step moved the model
        assert two["num_tokens"] == one["num_tokens"] / 2  # CP=1 is DP=2 over the same batch twice
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
        # Adam's first step is ~lr * sign(grad): a grad near 0 amplifies summation-order differences
        # (seen: one element in 8192 off by 1e-5 = 0.1% of lr), so a tolerance of 1% of a step
        for name, value in one["weights_after"].items():
            torch.testing.assert_close(two["weights_after"][name], value, rtol=0, atol=1e-4, msg=name)


def assert_reloaded(runs: list[dict]) -> None:
    """The CP=2 run's checkpoint (after its step), loaded at CP=1, gives its weights exactly."""
    for rank in runs:
        for name, value in rank["cp2"]["weights_after"].items():
            torch.testing.assert_close(rank["reloaded"][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_sft_cli_at_context_parallel_2(tmp_path):
    """The real trainer path: `nemo-rlsr sft` under torchrun at CP=2 (DP=1), packed rows; its
    checkpoint then exported by `nemo-rlsr export-hf` (one process: CP=1)."""
    import json

    from cli_runner import cli, run_cli

    cli("sft", "sft_tiny.yaml", ["parallel.context_parallel=2", "sft.pack_sequences=true", "sft.steps=4",
                                 "sft.warmup_steps=0", "trainer.progress_bar=false", f"trainer.output_dir={tmp_path}"],
        nprocs=2)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    run_cli("export-hf", "--checkpoint", str(tmp_path / "checkpoints" / "step_0000004"), "--out", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.slow
def test_rlsr_cli_at_context_parallel_2(tmp_path):
    """`nemo-rlsr train` (torch rollout engine, CP switched off while sampling) at CP=2 on 2 ranks."""
    import json

    from cli_runner import cli

    cli("train", "rlsr_tiny.yaml", ["parallel.context_parallel=2", "pretrain.steps=2", "pretrain.batch_size=8",
                                    "grpo.prompts_per_step=4", "grpo.num_generations=2", "grpo.micro_batch_size=4",
                                    "rollout.max_new_tokens=8", "trainer.steps=2", "trainer.heldout_eval=false",
                                    "trainer.progress_bar=false", f"trainer.output_dir={tmp_path}"], nprocs=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(-1.0 <= r["reward/mean"] <= 1.0 and math.isfinite(r["loss"]) for r in records)
