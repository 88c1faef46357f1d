"""The KV-cache sampler against the trainer's own teacher-forced forward pass."""

import pytest
import torch

from nemo_rlsr.config import ModelConfig, OptimizerConfig
from nemo_rlsr.generation.interface import SamplingParams
from nemo_rlsr.generation.sampling import (
    request_seeds,
    sample_rows,
    stop_string_end,
    top_k_filter,
    top_p_filter,
)
from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
from nemo_rlsr.models.policy import MegatronPolicy, attention_mask

VOCAB = 61  # deliberately not a multiple of 8: exercises the padded-vocab mask
PAD, EOS = 0, 1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]


@pytest.fixture(scope="module")
def policy(single_rank):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      max_sequence_length=32)
    return MegatronPolicy(cfg, OptimizerConfig(lr=1e-3), VOCAB, single_rank)


def teacher_forced_logits(policy, batch):
    ids = batch.input_ids
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    policy.module.eval()
    with torch.no_grad():
        return policy.module(ids, positions, attention_mask(batch.valid))


def test_greedy_equals_teacher_forced_argmax(policy):
    engine = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB)
    rollouts = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, greedy=True), seed=0)
    batch = rollouts.to_token_batch()
    argmax = teacher_forced_logits(policy, batch)[..., :VOCAB].argmax(-1)
    mask = rollouts.response_mask.bool()
    assert mask.sum() >= len(PROMPTS)
    assert torch.equal(argmax[mask], batch.targets[mask])
    # prompts are left-padded to a common length and the response starts right after them
    for row, prompt in enumerate(PROMPTS):
        assert batch.input_ids[row, 5 - len(prompt) : 5].tolist() == prompt
        assert not batch.valid[row, : 5 - len(prompt)].any()


def test_sampled_logprobs_equal_trainer_logprobs(policy):
    engine = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB)
    rollouts = engine.generate(PROMPTS * 4, SamplingParams(max_new_tokens=12), seed=7)
    trainer = policy.logprobs(rollouts.to_token_batch(), micro_batch_size=8)
    mask = rollouts.response_mask
    diff = ((trainer - rollouts.engine_logprobs).abs() * mask).sum() / mask.sum()
    assert float((trainer - rollouts.engine_logprobs).abs().mul(mask).max()) < 1e-4
    assert float(torch.exp(diff)) < 1.001  # token_mult_prob_error
    assert all(t < VOCAB for ids in rollouts.response_ids for t in ids), "sampled a padded vocab id"


def test_same_seed_same_samples(policy):
    engine = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB)
    params = SamplingParams(max_new_tokens=12)
    first = engine.generate(PROMPTS, params, seed=3)
    assert first.response_ids == engine.generate(PROMPTS, params, seed=3).response_ids
    assert first.response_ids != engine.generate(PROMPTS, params, seed=4).response_ids


def test_generation_stops_at_eos(policy):
    greedy = SamplingParams(max_new_tokens=10, greedy=True)
    free = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB).generate(PROMPTS, greedy, seed=0)
    # Declare the token that row 0 emits third to be EOS: row 0 must stop right after it.
    stop_token = free.response_ids[0][2]
    stopped = TorchRolloutEngine(policy.module, PAD, stop_token, VOCAB).generate(PROMPTS, greedy, seed=0)
    expected = free.response_ids[0][: free.response_ids[0].index(stop_token) + 1]
    assert stopped.response_ids[0] == expected
    assert not bool(stopped.truncated[0])
    assert int(stopped.response_mask[0].sum()) == len(expected)
    for row in range(len(PROMPTS)):  # every row is the free run cut after its first stop token
        ids = free.response_ids[row]
        cut = ids[: ids.index(stop_token) + 1] if stop_token in ids else ids
        assert stopped.response_ids[row] == cut
        assert bool(stopped.truncated[row]) == (stop_token not in ids)
    # rows that stopped left the batch (their KV rows dropped): the others' logprobs are unchanged
    trainer = policy.logprobs(stopped.to_token_batch(), micro_batch_size=4)
    assert float((trainer - stopped.engine_logprobs).abs().mul(stopped.response_mask).max()) < 1e-4


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # the top token always survives
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_bad_sampling_params_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=4, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(max_new_tokens=4, top_k=-1)
    with pytest.raises(ValueError, match="n "):
        SamplingParams(max_new_tokens=4, n=0)


def detokenize(ids):
    return "".join(f"<{i}>" for i in ids)


def test_stop_string_spanning_two_tokens_ends_the_row_at_its_last_token(policy):
    greedy = SamplingParams(max_new_tokens=10, greedy=True, stop_on_eos=False)
    free = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB).generate(PROMPTS, greedy, seed=0)
    stop = detokenize(free.response_ids[0][2:4])
    engine = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB, detokenize=detokenize)
    stopped = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, greedy=True, stop_on_eos=False,
                                                      stop=(stop,)), seed=0)
    for row, ids in enumerate(free.response_ids):
        cut = next((k for k in range(1, len(ids) + 1) if stop in detokenize(ids[:k])), None)
        assert stopped.response_ids[row] == (ids[:cut] if cut else ids)
        assert bool(stopped.truncated[row]) == (cut is None)
        assert int(stopped.response_mask[row].sum()) == len(stopped.response_ids[row])
    assert len(stopped.response_ids[0]) <= 4
    with pytest.raises(ValueError, match="detokenize"):
        TorchRolloutEngine(policy.module, PAD, EOS, VOCAB).generate(PROMPTS, SamplingParams(4, stop=("x",)), 0)


def test_n_samples_sharing_the_prompt_kv_equal_the_unshared_path(policy):
    params = SamplingParams(max_new_tokens=8, top_k=20, top_p=0.9, n=3)
    shared = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB).generate(PROMPTS, params, seed=5)
    unshared = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB, share_prompt_kv=False).generate(
        PROMPTS, params, seed=5)
    assert len(shared.response_ids) == 3 * len(PROMPTS)
    assert shared.response_ids == unshared.response_ids
    torch.testing.assert_close(shared.engine_logprobs, unshared.engine_logprobs, atol=1e-5, rtol=0)
    for i, prompt in enumerate(PROMPTS):  # group-contiguous rows, samples of one prompt differ
        for row in range(3 * i, 3 * i + 3):
            assert shared.input_ids[row, 5 - len(prompt) : 5].tolist() == prompt
        assert len({tuple(shared.response_ids[r]) for r in range(3 * i, 3 * i + 3)}) > 1


def test_a_requests_samples_do_not_depend_on_the_rest_of_the_batch(policy):
    engine = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB)
    params = SamplingParams(max_new_tokens=8, n=2)
    seeds = [11, 12, 13, 14]
    batch = engine.generate(PROMPTS, params, seed=seeds)
    alone = engine.generate(PROMPTS[2:3], params, seed=seeds[2:3])
    assert alone.response_ids == batch.response_ids[4:6]
    reordered = engine.generate(PROMPTS[::-1], params, seed=seeds[::-1])
    assert reordered.response_ids[2:4] == batch.response_ids[4:6]
    assert request_seeds(7, 3) == request_seeds(7, 3) and len(set(request_seeds(7, 3))) == 3


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [5.0, 5.0, 1.0, 0.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert torch.isfinite(top_k_filter(logits, 1)).tolist()[1] == [True, True, False, False]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_zero_mass():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.8]]).expand(4000, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tokens = sample_rows(probs, gens)
    assert set(tokens.tolist()) == {1, 3}
    assert abs(float((tokens == 1).float().mean()) - 0.2) < 0.03


def test_stop_string_end_is_the_earliest_complete_match():
    assert stop_string_end("ab</s>cd\n\n", ["\n\n", "</s>"]) == 6
    assert stop_string_end("abc", ["x"]) is None


def test_without_an_expert_group_the_decode_loop_runs_no_collective(policy, monkeypatch):
    """No MoE collective crosses prompts here, so the decode loop runs `Alone`: no all-reduce per
    step and no filler rows (lockstep's costs are paid only under expert parallelism)."""
    import torch.distributed as dist

    from nemo_rlsr.generation.lockstep import Alone, decode_strategy

    reduces = []
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: reduces.append(args))
    rollouts = TorchRolloutEngine(policy.module, PAD, EOS, VOCAB).generate(PROMPTS, SamplingParams(6, n=2), seed=0)
    assert reduces == [] and len(rollouts.response_ids) == 2 * len(PROMPTS)
    assert isinstance(decode_strategy(torch.device("cpu")), Alone)
