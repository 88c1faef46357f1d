"""megatron-core's own inference engine (`rollout.engine=megatron`) run for real, on the CPU.

megatron-core's static engine (StaticInferenceEngine + TextGenerationController, the legacy static
batching path) runs over gloo on the CPU once nemo_rlsr.distributed.cpu_compat points torch.cuda at
the CPU, so its defects show here against the installed megatron-core (0.16.1 on Python 3.11): the
references are our torch sampler (tests/test_torch_sampler.py checks it against the trainer's
teacher-forced forward) and the trainer's own logprobs at the sampling temperature. On a machine with
CUDA the same tests run megatron's CUDA path (cpu_compat is inactive there). The engine is still
refused for users without CUDA (generation/factory.engine_problems): it is built and timed for GPUs.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from nemo_rlsr.config import ModelConfig, OptimizerConfig, RLSRConfig
from nemo_rlsr.generation.interface import SamplingParams
from nemo_rlsr.generation.megatron_engine import MegatronRolloutEngine, response_from_samples
from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
from nemo_rlsr.models.policy import MegatronPolicy

VOCAB, PAD = 61, 0  # 61: the model's vocabulary is padded to 128, so ids 61..127 exist but are not tokens
TEMPERATURE = 0.7
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]
MAX_SEQ = 32


@pytest.fixture(scope="module")
def policy(single_rank):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      max_sequence_length=MAX_SEQ)
    return MegatronPolicy(cfg, OptimizerConfig(lr=1e-3), VOCAB, single_rank)


def megatron(module, eos: int, max_batch_size: int = 16) -> MegatronRolloutEngine:
    return MegatronRolloutEngine(module, PAD, eos, VOCAB, max_batch_size=max_batch_size,
                                 max_sequence_length=MAX_SEQ)


def sampling(**kwargs) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 10, "temperature": TEMPERATURE, **kwargs})


def eos_in_the_middle(module, params: SamplingParams, seed: int) -> tuple[int, list[int]]:
    """A token that row 0 samples at step 3 (before any earlier occurrence of it), declared EOS:
    with the same seeds row 0 must then end right after it. Returns (token, row 0's free response)."""
    free = TorchRolloutEngine(module, PAD, -1, VOCAB).generate(
        PROMPTS, dataclasses.replace(params, stop_on_eos=False), seed)
    row = free.response_ids[0]
    token = next(t for t in row[3:] if t not in row[:3])
    return token, row


def test_eos_ends_the_row_is_kept_and_counts_as_finished(policy):
    params = sampling()
    eos, free_row = eos_in_the_middle(policy.module, params, seed=5)
    theirs = megatron(policy.module, eos).generate(PROMPTS, params, seed=5)
    assert theirs.response_ids[0] == free_row[: free_row.index(eos) + 1]  # EOS is the last response token
    assert not bool(theirs.truncated[0])
    assert theirs.response_mask[0].sum() == len(theirs.response_ids[0])  # EOS is trained
    ours = TorchRolloutEngine(policy.module, PAD, eos, VOCAB).generate(PROMPTS, params, seed=5)
    assert theirs.response_ids == ours.response_ids
    assert torch.equal(theirs.truncated, ours.truncated)


def test_stop_on_eos_false_runs_every_row_to_max_new_tokens(policy):
    params = sampling(stop_on_eos=False)
    eos, free_row = eos_in_the_middle(policy.module, params, seed=5)
    theirs = megatron(policy.module, eos).generate(PROMPTS, params, seed=5)
    assert theirs.response_ids[0] == free_row and eos in free_row
    assert [len(r) for r in theirs.response_ids] == [params.max_new_tokens] * len(PROMPTS)
    assert bool(theirs.truncated.all())


def test_logprobs_are_the_trainers_at_the_sampling_temperature(policy):
    rollouts = megatron(policy.module, eos=1).generate(PROMPTS * 2, sampling(max_new_tokens=12, n=2), seed=7)
    trainer = policy.logprobs(rollouts.to_token_batch(), micro_batch_size=8, temperature=TEMPERATURE)
    mask = rollouts.response_mask
    assert mask.sum() > 50
    assert float((trainer - rollouts.engine_logprobs).abs().mul(mask).max()) < 1e-4
    mismatch = ((trainer - rollouts.engine_logprobs).abs() * mask).sum() / mask.sum()
    assert float(torch.exp(mismatch)) < 1.0001  # the trainer's token_mult_prob_error


def test_top_k_with_top_p_samples_what_the_torch_sampler_samples(policy):
    params = sampling(top_k=20, top_p=0.9, n=3)
    theirs = megatron(policy.module, eos=1).generate(PROMPTS, params, seed=11)
    ours = TorchRolloutEngine(policy.module, PAD, 1, VOCAB).generate(PROMPTS, params, seed=11)
    assert theirs.response_ids == ours.response_ids
    assert torch.equal(theirs.input_ids, ours.input_ids) and torch.equal(theirs.response_mask, ours.response_mask)
    assert torch.allclose(theirs.engine_logprobs, ours.engine_logprobs, atol=1e-5)


def test_each_request_follows_its_own_seed_whatever_the_batch(policy):
    engine, params = megatron(policy.module, eos=1), sampling(n=2)
    alone = engine.generate([PROMPTS[2]], params, seed=[123])
    among = engine.generate(PROMPTS, params, seed=[9, 8, 123, 7])
    assert among.response_ids[4:6] == alone.response_ids
    other = engine.generate([PROMPTS[2]], params, seed=[124])
    assert other.response_ids != alone.response_ids


def test_the_global_torch_rng_is_left_alone(policy):
    torch.manual_seed(2024)
    expected = torch.rand(3)
    torch.manual_seed(2024)
    megatron(policy.module, eos=1).generate(PROMPTS, sampling(), seed=3)
    assert torch.equal(torch.rand(3), expected)  # dropout and data order downstream are not reseeded


def test_padded_vocabulary_ids_are_never_sampled(policy):
    weight = policy.module.shared_embedding_or_output_weight()
    saved = weight.detach().clone()
    try:
        with torch.no_grad():  # padded rows whose logits dominate: the engine must still never pick them
            weight[VOCAB] = 100 * weight[5]
            weight[VOCAB + 1] = -100 * weight[5]
        engine = megatron(policy.module, eos=1)
        for params in (sampling(), sampling(greedy=True)):
            rollouts = engine.generate(PROMPTS, params, seed=1)
            assert all(0 <= t < VOCAB for row in rollouts.response_ids for t in row), rollouts.response_ids
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_more_rows_than_the_kv_cache_holds_run_in_turns(policy):
    params = sampling(n=2)
    wide = megatron(policy.module, eos=1, max_batch_size=16).generate(PROMPTS, params, seed=4)
    narrow = megatron(policy.module, eos=1, max_batch_size=3).generate(PROMPTS, params, seed=4)
    assert narrow.response_ids == wide.response_ids
    assert torch.allclose(narrow.engine_logprobs, wide.engine_logprobs, atol=1e-5)  # other batch, other float sums


def test_kv_cache_is_sized_to_this_ranks_rows(policy):
    from nemo_rlsr.generation.factory import build_engine

    cfg = RLSRConfig()
    cfg.rollout.engine = "megatron"
    cfg.grpo.prompts_per_step, cfg.grpo.num_generations = 16, 4
    data_parallel = SimpleNamespace(module=policy.module, ctx=dataclasses.replace(policy.ctx, dp=4))
    tokenizer = SimpleNamespace(vocab_size=VOCAB, pad_id=PAD, eos_id=1)
    engine = build_engine(cfg, data_parallel, tokenizer, run_dir=None)
    assert engine.max_batch_size == 16 // 4 * 4  # this rank samples 4 prompts x 4, not the global 64


def test_inference_mode_is_released_after_generate(policy):
    """megatron-core >= 0.18: StaticInferenceEngine.__init__ sets the process-wide InferenceMode flag and
    nothing clears it (core_v0.18.0 / core_v0.19.0 megatron/core/inference/engines/static_engine.py);
    GPTModel.forward and the attention read it (megatron/core/models/gpt/gpt_model.py)."""
    utils = pytest.importorskip("megatron.core.inference.utils")
    if not hasattr(utils, "InferenceMode"):
        pytest.skip("megatron-core < 0.18 has no InferenceMode flag")
    megatron(policy.module, eos=1).generate(PROMPTS, sampling(), seed=0)
    assert not utils.InferenceMode.is_active()


# ---------------------------------------------------------------- post-processing (pure)


def test_response_from_samples_keeps_eos_and_checks_the_engines_tokens():
    EOS = 1
    # the engine stopped on EOS and dropped it: it is put back, with its logprob
    assert response_from_samples([4, 5, EOS, 9], [-1.0, -2.0, -3.0, -4.0], [4, 5], EOS, True, 8) == (
        [4, 5, EOS], [-1.0, -2.0, -3.0], True)
    # EOS is an ordinary token when stop_on_eos is off; cut at max_new_tokens
    assert response_from_samples([4, EOS, 6, 7], [-1.0] * 4, [4, EOS, 6], EOS, False, 3) == (
        [4, EOS, 6], [-1.0] * 3, False)
    # ran out of tokens without EOS: truncated
    assert response_from_samples([4, 5, 6], [-1.0] * 3, [4, 5, 6], EOS, True, 3) == ([4, 5, 6], [-1.0] * 3, False)
    with pytest.raises(RuntimeError, match="engine returned"):
        response_from_samples([4, 5, EOS], [-1.0] * 3, [4, 7], EOS, True, 8)


# ---------------------------------------------------------------- the pin


def test_megatron_core_pin_names_the_tested_releases():
    """pyproject pins one megatron-core per Python: 0.16.1 below 3.12 (the newest that installs there;
    this CI), 0.19.2 from 3.12 (the NGC image's Python; its engine path was run against 0.19.2's
    source, see the module docstring of generation/megatron_engine.py). The container installs the
    3.12 pin (containers/requirements.txt)."""
    import sys
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    repo = Path(__file__).resolve().parents[1]
    deps = [Requirement(d) for d in tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = {}
    for python in ("3.11", "3.12", "3.13"):
        chosen = [r for r in deps if r.name == "megatron-core"
                  and (r.marker is None or r.marker.evaluate({"python_version": python}))]
        assert len(chosen) == 1, (python, chosen)
        (spec,) = chosen[0].specifier
        assert spec.operator == "==", f"Python {python}: {chosen[0]} is not a pin"
        pins[python] = spec.version
    assert pins == {"3.11": "0.16.1", "3.12": "0.19.2", "3.13": "0.19.2"}
    running = "3.11" if sys.version_info < (3, 12) else "3.12"
    assert version("megatron-core") == pins[running]  # what this machine runs (CI: Python 3.11)
    container = [line.split("#")[0].strip() for line in (repo / "containers" / "requirements.txt").read_text().splitlines()]
    assert f"megatron-core=={pins['3.12']}" in container  # the image is Python 3.12
