"""SFT sequence packing: bins, block-diagonal mask, positions, and equality with one example per row."""

import pytest
import torch

from nemo_rlsr.config import ModelConfig, OptimizerConfig
from nemo_rlsr.data.packing import pack_bins, packed_sft_batch
from nemo_rlsr.models.policy import MegatronPolicy, attention_mask, position_ids
from nemo_rlsr.trainer.pretrain import nll_loss
from nemo_rlsr.trainer.sft import sft_batch

VOCAB, PAD = 53, 0
MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_sequence_length=24)


def test_pack_bins_first_fit_longest_first():
    assert pack_bins([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert pack_bins([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="9 tokens does not fit a packed row of 8"):
        pack_bins([9, 1], 8)


def test_positions_restart_and_mask_is_block_diagonal_causal():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    assert position_ids(segments, segments).tolist() == [[0, 1, 0, 1, 2, 0]]
    attended = ~attention_mask(segments > 0, segments)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(attended, expected)
    # Without segments the mask is the plain causal one over valid keys (the unpacked behaviour).
    assert torch.equal(attention_mask(segments > 0), attention_mask(segments > 0, None))


def random_examples(generator: torch.Generator, count: int) -> list[tuple[list[int], int]]:
    examples = []
    for _ in range(count):
        length = int(torch.randint(4, 12, (1,), generator=generator))
        prompt_len = int(torch.randint(1, length - 1, (1,), generator=generator))
        examples.append((torch.randint(2, VOCAB, (length,), generator=generator).tolist(), prompt_len))
    return examples


def response_logprobs(logprobs: torch.Tensor, batch, examples) -> list[list[float]]:
    """Per example, the logprobs at its loss positions, read back out of either layout."""
    flat = [logprobs[r][batch.loss_mask[r].bool()].tolist() for r in range(len(batch))]
    if batch.segment_ids is None:
        return flat
    out = {}
    for r in range(len(batch)):
        seg = batch.segment_ids[r][batch.loss_mask[r].bool()]
        values = logprobs[r][batch.loss_mask[r].bool()]
        for s in seg.unique().tolist():
            ids = batch.input_ids[r][batch.segment_ids[r] == s].tolist()
            out[tuple(ids)] = values[seg == s].tolist()
    return [out[tuple(ids)] for ids, _ in examples]


def test_packed_logprobs_and_gradients_equal_one_example_per_row(single_rank):
    examples = random_examples(torch.Generator().manual_seed(3), 8)
    unpacked = sft_batch(examples, max(len(ids) for ids, _ in examples), PAD)
    packed = packed_sft_batch(examples, MODEL.max_sequence_length, PAD, rows_multiple=2)
    assert len(packed) < len(unpacked) and len(packed) % 2 == 0
    assert packed.loss_mask.sum() == unpacked.loss_mask.sum() == sum(len(i) - p for i, p in examples)

    torch.manual_seed(0)
    policy = MegatronPolicy(MODEL, OptimizerConfig(lr=1e-3), VOCAB, single_rank)
    lp_unpacked = response_logprobs(policy.logprobs(unpacked, 1), unpacked, examples)
    lp_packed = response_logprobs(policy.logprobs(packed, 2), packed, examples)
    for a, b in zip(lp_unpacked, lp_packed):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    # The same rows without segment ids let examples attend to each other: the test can fail.
    leaky = type(packed)(packed.input_ids, packed.valid, packed.loss_mask, {}, None)
    lp_leaky = [v for row in response_logprobs(policy.logprobs(leaky, 2), leaky, examples) for v in row]
    assert not torch.allclose(torch.tensor(lp_leaky).sort().values,
                              torch.tensor([v for row in lp_unpacked for v in row]).sort().values, atol=1e-3)

    # One optimizer step each from the same weights: same loss, same gradient norm.
    torch.manual_seed(0)
    twin = MegatronPolicy(MODEL, OptimizerConfig(lr=1e-3), VOCAB, single_rank)
    step_unpacked = policy.train_step(unpacked, 4, nll_loss)
    step_packed = twin.train_step(packed, 2, nll_loss)
    assert step_packed["num_tokens"] == step_unpacked["num_tokens"]
    assert abs(step_packed["loss"] - step_unpacked["loss"]) < 1e-5
    assert abs(step_packed["grad_norm"] - step_unpacked["grad_norm"]) < 1e-4 * step_unpacked["grad_norm"]
