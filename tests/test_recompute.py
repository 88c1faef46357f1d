"""Activation recompute changes memory, not math: one training step with megatron's full
(uniform / block) or selective recompute gives the same loss, gradient norm and updated weights
as the step without it (CPU, local spec, the real MegatronPolicy)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cli_runner import cli
from tests.distributed_helpers import VOCAB, nll_loss, optimizer_config, tiny_model_config, token_batch


def one_step(ctx, model_cfg, initial_state):
    """A train step; also counts how often layer 0's core attention ran (twice per micro-batch
    when it is recomputed in the backward pass)."""
    from nemo_rlsr.models.policy import MegatronPolicy

    policy = MegatronPolicy(model_cfg, optimizer_config(), VOCAB, ctx)
    policy.module.load_state_dict(initial_state)
    calls = []
    policy.module.decoder.layers[0].self_attention.core_attention.register_forward_hook(lambda *_: calls.append(1))
    metrics = policy.train_step(token_batch(), micro_batch_size=2, loss_fn=nll_loss)
    return policy, {**metrics, "attention_calls": len(calls)}


@pytest.mark.parametrize("recompute", [
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
    {"recompute_granularity": "selective"},
])
def test_recompute_step_equals_plain_step(single_rank, recompute):
    from nemo_rlsr.models.policy import MegatronPolicy

    plain_cfg = tiny_model_config()
    initial = {k: v.clone() for k, v in MegatronPolicy(plain_cfg, None, VOCAB, single_rank).module.state_dict().items()
               if v is not None and isinstance(v, torch.Tensor)}
    plain, plain_metrics = one_step(single_rank, plain_cfg, initial)
    recomputed, metrics = one_step(single_rank, dataclasses.replace(plain_cfg, **recompute), initial)

    assert recomputed.config.recompute_granularity == recompute["recompute_granularity"]
    assert (plain_metrics["attention_calls"], metrics["attention_calls"]) == (2, 4)  # 2 micro-batches
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-6)
    assert metrics["grad_norm"] == pytest.approx(plain_metrics["grad_norm"], rel=1e-5)
    assert plain_metrics["grad_norm"] > 0
    moved = 0
    for (name, p), q in zip(plain.module.named_parameters(), recomputed.module.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(p, initial[name])
    assert moved > 0  # the step did change the weights being compared


def cli_train(tmp_path, *overrides: str, expect: int = 0) -> str:
    args = ["pretrain.steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.micro_batch_size=8",
            "rollout.max_new_tokens=6", "trainer.steps=1", "trainer.heldout_eval=false", "trainer.progress_bar=false",
            f"trainer.output_dir={tmp_path}", *overrides]
    return cli("train", "rlsr_tiny.yaml", args, timeout=300, expect=expect)


@pytest.mark.slow
def test_trainer_runs_with_recompute_and_refuses_incomplete_setting(tmp_path):
    bad = cli_train(tmp_path / "bad", "model.recompute_granularity=full", expect=2)
    assert "model.recompute_granularity=full needs model.recompute_method in uniform, block" in bad
    assert "model.recompute_num_layers between 1 and the layers per pipeline stage (2)" in bad
    cli_train(tmp_path / "good", "model.recompute_granularity=full", "model.recompute_method=uniform",
              "model.recompute_num_layers=1")
    assert (tmp_path / "good" / "metrics.jsonl").read_text().count("\n") == 1
