"""The two placements of the KL reference (`grpo.reference_placement`) compute the same thing:
identical reference logprobs, the policy's weights bit-identical after a cpu_swap pass, the same
reference loaded from a checkpoint, and the same training trajectory of the real trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_runner import cli
from nemo_rlsr.trainer.fingerprint import module_sha256
from tests.distributed_helpers import VOCAB, optimizer_config, tiny_model_config, token_batch


def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture
def policy_and_references(single_rank):
    from nemo_rlsr.models.policy import MegatronPolicy
    from nemo_rlsr.models.reference import build_reference

    policy = MegatronPolicy(tiny_model_config(), optimizer_config(), VOCAB, single_rank)
    refs = {p: build_reference(p, policy, tiny_model_config(), VOCAB, single_rank)
            for p in ("resident", "cpu_swap")}
    return policy, refs


def test_cpu_swap_logprobs_equal_resident_and_restore_policy_bits(policy_and_references):
    policy, refs = policy_and_references
    for ref in refs.values():
        ref.freeze_from(policy)
    frozen = policy.logprobs(token_batch(), 2)
    perturb(policy.module, seed=1)  # the policy trains on: it now differs from the reference
    before = module_sha256(policy.module)
    trained = policy.logprobs(token_batch(), 2)
    assert not torch.equal(trained, frozen)

    storage = [p.data_ptr() for p in policy.module.parameters()]
    resident = refs["resident"].logprobs(token_batch(), 2)
    swapped = refs["cpu_swap"].logprobs(token_batch(), 2)
    assert torch.equal(swapped, resident) and torch.equal(resident, frozen)
    assert module_sha256(policy.module) == before  # weights put back bit for bit
    assert torch.equal(policy.logprobs(token_batch(), 2), trained)
    # Written in place: the parameters still live where DDP's buffers / the optimizer point.
    assert [p.data_ptr() for p in policy.module.parameters()] == storage


def test_reference_loaded_from_checkpoint(policy_and_references, tmp_path):
    from nemo_rlsr.trainer.checkpoint import save_checkpoint

    policy, refs = policy_and_references
    base = save_checkpoint(tmp_path, 0, policy, {"step": 0}, checksums=False)
    expected = policy.logprobs(token_batch(), 2)
    perturb(policy.module, seed=2)
    before = module_sha256(policy.module)
    for ref in refs.values():
        ref.load(base)
    assert module_sha256(policy.module) == before  # loading the reference left the policy alone
    for name, ref in refs.items():
        assert torch.equal(ref.logprobs(token_batch(), 2), expected), name


def test_unknown_placement_refused(single_rank):
    from nemo_rlsr.models.reference import build_reference

    with pytest.raises(ValueError, match="grpo.reference_placement='gpu'"):
        build_reference("gpu", None, tiny_model_config(), VOCAB, single_rank)


def train(run_dir: Path, placement: str, *extra: str) -> tuple[list[dict], dict]:
    args = ["pretrain.steps=10", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.micro_batch_size=8",
            "rollout.max_new_tokens=8", "trainer.steps=3", "trainer.checkpoint_every=2", "trainer.heldout_eval=false",
            "trainer.progress_bar=false", "grpo.kl_coef=0.5", "optimizer.lr=3e-3",
            f"grpo.reference_placement={placement}", f"trainer.output_dir={run_dir}", *extra]
    cli("train", "rlsr_tiny.yaml", args)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_trainer_trajectories_identical(tmp_path):
    resident, resident_summary = train(tmp_path / "resident", "resident")
    swapped, swapped_summary = train(tmp_path / "cpu_swap", "cpu_swap")
    assert len(resident) == len(swapped) == 3
    assert resident[-1]["kl"] > 0  # the reference term is live (a large kl_coef makes it matter)
    for a, b in zip(resident, swapped):
        for key in ("loss", "kl", "grad_norm", "reward/mean", "entropy"):
            assert a[key] == b[key], (a["step"], key)
    assert resident_summary["param_sha256"] == swapped_summary["param_sha256"]

    # Resume at step 2: the cpu_swap reference is reloaded from the base checkpoint through the
    # policy's module, then the policy from step 2; step 3 must come out the same.
    resumed = tmp_path / "cpu_swap_resumed"
    shutil.copytree(tmp_path / "cpu_swap", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000003")
    (resumed / "checkpoints" / "latest").write_text("step_0000002")
    again, _ = train(resumed, "cpu_swap", "--resume", "auto")
    for key in ("loss", "kl", "grad_norm", "reward/mean", "entropy"):
        assert again[-1][key] == swapped[-1][key], key
