"""The sampling temperature is an argument of the logprobs that must match the sampler, not a
property of the policy: likelihood objectives (base pre-training, SFT) train at temperature 1,
whatever `rollout.temperature` a run samples at, and the GRPO step takes every logprob at it.

Independent reference: the GPTModel called directly (outside megatron's schedule), its logits
divided by T and log-softmaxed over the tokenizer's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch, attention_mask, position_ids
from tests.distributed_helpers import VOCAB, nll_loss, optimizer_config, tiny_model_config, token_batch

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def plain_logprobs(module: torch.nn.Module, batch: TokenBatch, vocab: int, temperature: float) -> torch.Tensor:
    logits = module(batch.input_ids, position_ids(batch.input_ids), attention_mask(batch.valid))
    logp = torch.log_softmax(logits[..., :vocab].float() / temperature, dim=-1)
    return logp.gather(-1, batch.targets[..., None]).squeeze(-1)


def test_policy_logprobs_are_at_the_temperature_asked_for_and_at_one_by_default(single_rank):
    torch.manual_seed(3)
    policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, single_rank)
    batch = token_batch()
    mask = batch.loss_mask.bool()
    for temperature in (1.0, 0.7, 1.6):
        expected = plain_logprobs(policy.module.eval(), batch, VOCAB, temperature)
        got = policy.logprobs(batch, 2, temperature=temperature)
        assert torch.allclose(got[mask], expected[mask], atol=1e-5), temperature
    assert torch.equal(policy.logprobs(batch, 2), policy.logprobs(batch, 2, temperature=1.0))
    # the temperature matters: at 0.7 the numbers are not the T=1 ones
    assert not torch.allclose(policy.logprobs(batch, 2, temperature=0.7)[mask], expected[mask], atol=1e-2)


def test_an_nll_train_step_fits_the_temperature_one_likelihood(single_rank):
    """What base pre-training and SFT run: their loss is the NLL of softmax(logits), not of logits / T."""
    torch.manual_seed(4)
    policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, single_rank)
    batch = token_batch()
    expected = -(plain_logprobs(policy.module.eval(), batch, VOCAB, 1.0) * batch.loss_mask).sum() / batch.loss_mask.sum()
    metrics = policy.train_step(batch, 2, nll_loss)
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5])
def test_the_rlsr_run_trains_its_base_at_one_and_takes_grpo_logprobs_at_the_sampling_temperature(
        single_rank, tmp_path, monkeypatch, temperature):
    from nemo_rlsr.config import load_config
    from nemo_rlsr.trainer.rlsr import RLSRTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(REPO / "conf" / "rlsr_tiny.yaml", [
        "trainer.progress_bar=false", "trainer.heldout_eval=false", f"trainer.output_dir={tmp_path}",
        "pretrain.steps=2", "pretrain.batch_size=8", "grpo.prompts_per_step=2", "grpo.num_generations=4",
        "grpo.micro_batch_size=8", "rollout.max_new_tokens=6", "trainer.steps=1",
        f"rollout.temperature={temperature}"])
    trainer = RLSRTrainer(cfg)
    try:
        trainer.setup()
        # nothing of the sampling temperature is baked into the policy the base was pre-trained in
        rollouts = trainer.engine.generate(trainer.train.token_ids[:2], trainer.sampling, seed=5)
        batch = rollouts.to_token_batch()
        mask = rollouts.response_mask.bool()
        at_one = plain_logprobs(trainer.policy.module.eval(), batch, trainer.tokenizer.vocab_size, 1.0)
        assert torch.allclose(trainer.policy.logprobs(batch, 8)[mask], at_one[mask], atol=1e-5)
        # the engine sampled at T: its logprobs are the policy's at T, not at 1
        at_t = trainer.policy.logprobs(batch, 8, temperature=temperature)
        assert torch.allclose(at_t[mask], rollouts.engine_logprobs[mask], atol=1e-4)
        assert not torch.allclose(at_one[mask], rollouts.engine_logprobs[mask], atol=1e-2)

        metrics = trainer.train_step()
        # one mini-batch: the loss's logprobs are the old ones exactly when both are at T
        assert metrics["ratio"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["token_mult_prob_error"] == pytest.approx(1.0, abs=1e-4)
    finally:
        trainer.close()
