"""Every tensor a training step consumes reaches the model's device, and collectives get device
tensors: the real policy and trainers run on the fake accelerator (tests/fake_accelerator.py), where
a host tensor meeting a device tensor raises as it would on a GPU. Batches are built in host memory
(SFT rows, packing, pre-training windows, advantages from the encoders' host rewards); on the code
before `MegatronPolicy._run` moved them, each of these tests raised at the embedding lookup."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nemo_rlsr.algorithms.grpo import GRPOLossConfig
from nemo_rlsr.data.packing import packed_sft_batch
from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch
from nemo_rlsr.trainer.rlsr import grpo_loss_fn
from nemo_rlsr.trainer.sft import sft_batch
from tests.distributed_helpers import REPO_ROOT, SEQ_LEN, VOCAB, nll_loss, optimizer_config, run_workers, \
    tiny_model_config, token_batch
from tests.fake_accelerator import DEVICE, HostTensorOnDevice, fake_accelerator, place

WORKER = REPO_ROOT / "tests" / "device_boundary_worker.py"


def grpo_batch() -> TokenBatch:
    """token_batch() with GRPO's extras as the trainer gets them: per-row advantages from host
    rewards, per-token logprobs (host here, to show the boundary moves extras too)."""
    batch = token_batch()
    g = torch.Generator().manual_seed(1)
    batch.extras["advantages"] = torch.randn(len(batch), generator=g)
    for name in ("old_logprobs", "ref_logprobs", "engine_logprobs"):
        batch.extras[name] = -torch.rand(batch.input_ids.shape, generator=g)
    return batch


def sft_batches() -> dict[str, TokenBatch]:
    g = torch.Generator().manual_seed(2)
    examples = [(torch.randint(2, VOCAB, (n,), generator=g).tolist(), 3) for n in (9, 6, 12, 7)]
    return {"sft rows": sft_batch(examples, 12, 0), "packed sft rows": packed_sft_batch(examples, 24, 0, 2)}


def test_planted_host_tensors_are_caught(single_rank, monkeypatch):
    """Negative controls: the fake accelerator raises on exactly what a GPU would refuse."""
    with fake_accelerator():
        policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, single_rank)
        assert policy.device == DEVICE and {place(p) for p in policy.module.parameters()} == {"device"}
        batch = token_batch()
        policy.train_step(batch, 2, nll_loss)  # the step itself is clean

        planted = torch.ones(SEQ_LEN)  # built in host memory inside the loss

        def loss_with_a_host_tensor(logprobs, entropy, mb):
            return nll_loss(logprobs * planted, entropy, mb)

        with pytest.raises(HostTensorOnDevice, match="mul mixes a device tensor .* with a host tensor"):
            policy.train_step(batch, 2, loss_with_a_host_tensor)
        with pytest.raises(HostTensorOnDevice, match="torch.distributed.all_reduce on a host tensor"):
            dist.all_reduce(torch.zeros(2))
        torch.zeros(2, device="cuda") * torch.tensor(2.0)  # a 0-dim host tensor is a scalar to CUDA: allowed
        # The old boundary: batches fed to the model as built.
        monkeypatch.setattr(TokenBatch, "to", lambda self, device: self)
        with pytest.raises(HostTensorOnDevice, match="embedding mixes a device tensor .* with a host tensor"):
            policy.logprobs(batch, 2)


@pytest.mark.parametrize("kind", ["grpo", "sft rows", "packed sft rows"])
def test_policy_step_runs_on_the_device(single_rank, kind):
    """logprobs and train_step on host-built batches (extras included) run on the device, and the
    numbers are the CPU's: the fake changes where tensors are said to live, not their values."""
    loss = grpo_loss_fn(GRPOLossConfig(tis_cap=2.0)) if kind == "grpo" else nll_loss
    with fake_accelerator():
        batch = grpo_batch() if kind == "grpo" else sft_batches()[kind]  # host tensors (made on the fake)
        policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, single_rank)
        on_device = policy.logprobs(batch, 2)
        assert place(on_device) == "device" and on_device.device == DEVICE
        metrics = policy.train_step(batch, 2, loss, with_entropy=kind == "grpo")
        after_step = policy.logprobs(batch, 2)
    assert metrics["num_tokens"] == float(batch.loss_mask.sum()) and torch.isfinite(torch.tensor(metrics["loss"]))
    assert not torch.equal(after_step, on_device)  # the step changed the weights
    torch.testing.assert_close(policy.logprobs(batch, 2), after_step, rtol=0, atol=0)  # same model off the fake


def test_parameters_are_created_on_the_device(single_rank, monkeypatch):
    """With CUDA, megatron creates its weights on the GPU (use_cpu_initialization=False): built on
    the host and moved afterwards, Transformer Engine would quantize them (fp8_param) on the host.
    `build_gpt`'s `.cuda()` finds them there already; only the local spec's torch norms, which
    megatron builds without a device either way, are still in host memory and moved by it."""
    found = {}
    original = torch.nn.Module.cuda

    def record_then_move(module, device=None):
        found.update((name, place(p)) for name, p in module.named_parameters())
        return original(module, device)

    monkeypatch.setattr(torch.nn.Module, "cuda", record_then_move)
    with fake_accelerator():
        policy = MegatronPolicy(tiny_model_config(), None, VOCAB, single_rank)
    assert policy.config.use_cpu_initialization is False
    on_host = sorted(name for name, where in found.items() if where != "device")
    assert all("layernorm" in name for name in on_host), on_host
    assert len(found) - len(on_host) >= 9  # embedding + 2 layers x (qkv, proj, fc1, fc2)
    assert {place(p) for p in policy.module.parameters()} == {"device"}
    assert MegatronPolicy(tiny_model_config(), None, VOCAB, single_rank).config.use_cpu_initialization is True


def tiny_run(tmp_path, config: str, *overrides: str):
    from nemo_rlsr.config import load_config

    return load_config(str(REPO_ROOT / "conf" / config), [
        "trainer.progress_bar=false", "trainer.heldout_eval=false", f"trainer.output_dir={tmp_path}", *overrides])


def test_rlsr_trainer_step_runs_on_the_device(single_rank, tmp_path, monkeypatch):
    """The whole RLSR step (base pre-training, rollouts from the torch sampler, MiniLM rewards on
    the host, advantages, policy and reference logprobs, GRPO update with truncated IS, metric
    gathering and reward diagnostics) on the fake accelerator."""
    from nemo_rlsr.trainer.rlsr import RLSRTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_run(tmp_path, "rlsr_tiny.yaml", "pretrain.steps=1", "pretrain.batch_size=8", "grpo.prompts_per_step=2",
                   "grpo.num_generations=4", "grpo.micro_batch_size=8", "rollout.max_new_tokens=6", "trainer.steps=1",
                   "grpo.tis_cap=2.0")
    with fake_accelerator():
        trainer = RLSRTrainer(cfg)
        try:
            trainer.setup()
            assert trainer.policy.device == DEVICE
            metrics = trainer.train_step()
        finally:
            trainer.close()
    assert -1.0 <= metrics["reward/mean"] <= 1.0 and metrics["num_tokens"] > 0
    assert {"reward/length_corr", "tis/weight_mean", "token_mult_prob_error"} <= set(metrics)


@pytest.mark.parametrize("pack", [False, True])
def test_sft_trainer_step_runs_on_the_device(single_rank, tmp_path, pack):
    from nemo_rlsr.trainer.sft import SFTTrainer

    cfg = tiny_run(tmp_path, "sft_tiny.yaml", "sft.steps=1", f"sft.pack_sequences={str(pack).lower()}")
    with fake_accelerator():
        trainer = SFTTrainer(cfg)
        try:
            trainer.setup()
            before = trainer.heldout_nll()
            metrics = trainer.train_step()
        finally:
            trainer.close()
    assert metrics["num_tokens"] > 0 and before > 0


@pytest.mark.slow
def test_collectives_at_dp2_take_device_tensors(tmp_path):
    """DP=2 on 2 gloo ranks: the trainer's DP gather of host rewards and the policy's metric and
    gradient reductions run on device tensors; a gather of host tensors is caught."""
    results = run_workers("dp2", tmp_path, nprocs=2, worker=WORKER)
    for rank, result in enumerate(results):
        assert result["gathered"] == [0.5, -0.25, 1.0, 0.75] and result["gathered_place"] == "device", rank
        assert result["host_gather_caught"], rank
        assert result["num_tokens"] == 31.0 and result["grad_norm"] > 0, rank
    assert results[0]["loss"] == results[1]["loss"]
