"""THD packed-sequence layout (models/packed_seq.py) against the padded [B, T] path it replaces.

The stream's cu_seqlens, positions and block-causal mask are checked against what the segment-id
path (policy.position_ids, policy.attention_mask) implies, token by token; the gather / scatter is
checked as a round trip; a real megatron-core GPTModel on the local spec gives the same logprobs,
loss and gradients through the THD path (cu_seqlens -> mask) as through the padded one, for
left-padded rollout rows and packed SFT rows. Transformer Engine is not installed here: its side is
checked up to the boundary (the PackedSeqParams passed, the spec's mask type).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distributed_helpers import LEFT_PADS, SEQ_LEN, VOCAB, optimizer_config, tiny_model_config, token_batch
from nemo_rlsr.data.packing import packed_sft_batch
from nemo_rlsr.models.packed_seq import block_causal_mask, thd_stream
from nemo_rlsr.models.policy import MegatronPolicy, attention_mask, position_ids
from test_packing import random_examples


def packed_batch():
    return packed_sft_batch(random_examples(torch.Generator().manual_seed(3), 8), SEQ_LEN, 0, rows_multiple=2)


def padded_path_stream_mask(valid: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Which stream token attends which under the padded path: the same row, and not masked by
    `attention_mask` there (tokens of different rows never meet)."""
    index = valid.reshape(-1).nonzero().squeeze(1)
    row, column = index // valid.shape[1], index % valid.shape[1]
    attended = ~attention_mask(valid, segment_ids)[row[:, None], 0, column[:, None], column[None, :]]
    return attended & (row[:, None] == row[None, :])


@pytest.mark.parametrize("kind", ["left_padded", "packed"])
def test_cu_seqlens_positions_and_mask_equal_the_segment_id_path(kind):
    batch = token_batch() if kind == "left_padded" else packed_batch()
    stream = thd_stream(batch.valid, batch.segment_ids)
    count = int(batch.valid.sum())
    assert stream.cu_seqlens.dtype == torch.int32 and int(stream.cu_seqlens[0]) == 0
    assert int(stream.cu_seqlens[-1]) == count == stream.length
    attended = ~block_causal_mask(stream.cu_seqlens_padded, stream.length)[0, 0]
    assert torch.equal(attended, padded_path_stream_mask(batch.valid, batch.segment_ids))
    expected = position_ids(batch.input_ids, batch.segment_ids)
    if kind == "left_padded":  # one sequence per row: its positions start at 0, not at the pad count
        expected = expected - torch.tensor(LEFT_PADS)[:, None]
        assert stream.cu_seqlens.tolist() == [0, 13, 29, 40, 55]  # rows of 16 - (3, 0, 5, 1) tokens
    assert torch.equal(stream.positions[0], expected[batch.valid])
    lengths = (stream.cu_seqlens[1:] - stream.cu_seqlens[:-1]).tolist()
    assert stream.max_seqlen == max(lengths)
    if kind == "packed":  # one sequence per example: the segment runs of every row
        runs = [int((batch.segment_ids[r] == s).sum()) for r in range(len(batch))
                for s in batch.segment_ids[r].unique().tolist() if s > 0]
        assert lengths == runs


def test_gather_scatter_round_trip_and_gradient():
    batch = packed_batch()
    stream = thd_stream(batch.valid, batch.segment_ids)
    assert torch.equal(stream.scatter(stream.gather(batch.input_ids)), batch.input_ids * batch.valid)
    values = torch.randn(*batch.input_ids.shape, 3, requires_grad=True)
    back = stream.scatter(stream.gather(values))
    assert torch.equal(back, values * batch.valid[..., None])
    back.sum().backward()
    assert torch.equal(values.grad, batch.valid[..., None].float().expand_as(values))


def test_alignment_pads_the_end_of_the_last_sequence_only():
    batch = token_batch()  # 55 valid tokens
    stream = thd_stream(batch.valid, None, multiple=8)
    assert stream.length == 56
    assert stream.cu_seqlens.tolist() == [0, 13, 29, 40, 55]
    assert stream.cu_seqlens_padded.tolist() == [0, 13, 29, 40, 56]  # TE: no pad between sequences
    assert stream.positions[0, -2:].tolist() == [14, 15]  # the last row's 15 tokens, then the pad
    assert stream.gather(batch.input_ids)[0, -1] == 0
    agreed = thd_stream(batch.valid, None, multiple=8, length=64)  # the longest over MoE peers (thd_streams)
    assert agreed.length == 64 and agreed.cu_seqlens_padded.tolist() == [0, 13, 29, 40, 64]
    empty = thd_stream(torch.zeros(2, 5, dtype=torch.bool), None, multiple=4)
    assert empty.cu_seqlens.tolist() == [0, 0] and empty.cu_seqlens_padded.tolist() == [0, 4]


def test_a_pad_inside_a_sequence_is_refused():
    valid = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="pad inside a sequence"):
        thd_stream(valid)
    thd_stream(valid, torch.tensor([[1, 0, 2]]))  # a pad between two segments is fine


def grpo_batch():
    batch = token_batch()
    gen = torch.Generator().manual_seed(5)
    shape = batch.input_ids.shape
    batch.extras.update(old_logprobs=-torch.rand(shape, generator=gen) * 3,
                        ref_logprobs=-torch.rand(shape, generator=gen) * 3, advantages=torch.randn(shape[0], generator=gen))
    return batch


@pytest.mark.parametrize("kind", ["left_padded", "packed"])
def test_thd_logprobs_loss_and_gradients_equal_the_padded_path_on_the_local_spec(single_rank, kind):
    from nemo_rlsr.algorithms.grpo import GRPOLossConfig
    from nemo_rlsr.trainer.pretrain import nll_loss
    from nemo_rlsr.trainer.rlsr import grpo_loss_fn

    batch = grpo_batch() if kind == "left_padded" else packed_batch()
    loss = grpo_loss_fn(GRPOLossConfig(kl_coef=0.1)) if kind == "left_padded" else nll_loss
    policies = {}
    for layout in ("mask", "thd"):
        cfg = dataclasses.replace(tiny_model_config(), attention_layout=layout)
        policies[layout] = MegatronPolicy(cfg, optimizer_config(), VOCAB, single_rank)
    assert policies["thd"].thd and not policies["mask"].thd
    policies["thd"].module.load_state_dict(policies["mask"].module.state_dict())
    policies["thd"].optimizer.reload_model_params()
    logprobs = {k: p.logprobs(batch, 2) for k, p in policies.items()}
    valid = batch.valid.bool()
    assert (logprobs["thd"][~valid] == 0).all()
    torch.testing.assert_close(logprobs["thd"][valid], logprobs["mask"][valid], atol=2e-6, rtol=0)
    # a budget's micro-batches (several streams of different lengths) give the same numbers
    budget = policies["thd"].logprobs(batch, 1, max_tokens=2 * SEQ_LEN)
    torch.testing.assert_close(budget[valid], logprobs["mask"][valid], atol=2e-6, rtol=0)
    metrics = {k: p.train_step(batch, 2, loss, with_entropy=kind == "left_padded") for k, p in policies.items()}
    for name, value in metrics["mask"].items():
        assert metrics["thd"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    grads = {k: torch.cat([p.main_grad.flatten() for p in policy.module.parameters()]) for k, policy in policies.items()}
    torch.testing.assert_close(grads["thd"], grads["mask"], atol=1e-6, rtol=1e-4)
    # the test can fail: with one causal mask over the whole stream, rows would see each other
    stream = thd_stream(batch.valid, batch.segment_ids)
    ids, module = stream.gather(batch.input_ids), policies["thd"].module.eval()
    one_sequence = block_causal_mask(torch.tensor([0, stream.length], dtype=torch.int32), stream.length)
    with torch.no_grad():
        apart = module(ids, stream.positions, **stream.attention_inputs(te_spec=False))
        leaky = module(ids, stream.positions, one_sequence)
    assert (apart - leaky).abs().max() > 1e-3


def test_te_spec_gets_packed_seq_params_and_keeps_causal_attention(single_rank):
    """Up to the Transformer Engine boundary: under THD the TE spec keeps megatron's `causal` (which
    megatron's TEDotProductAttention turns into `padding_causal` for qkv_format thd, core_v0.16.1
    megatron/core/extensions/transformer_engine.py), gets PackedSeqParams and no mask; under `mask`
    it gets `arbitrary`. The local spec stands in for TE's (same ModuleSpec tree shape)."""
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_rlsr.models.gpt import dense_layer_spec, with_layout_mask_type
    from test_attention_mask_spec import mask_types

    spec = dense_layer_spec(tiny_model_config(), te=False)
    for layout, te, expected in (("auto", True, AttnMaskType.causal), ("thd", True, AttnMaskType.causal),
                                 ("mask", True, AttnMaskType.arbitrary), ("auto", False, AttnMaskType.causal)):
        cfg = dataclasses.replace(tiny_model_config(), attention_layout=layout)
        assert mask_types(with_layout_mask_type(spec, cfg, te)) == [expected], (layout, te)
    batch = token_batch()
    inputs = thd_stream(batch.valid, None, multiple=8).attention_inputs(te_spec=True)
    assert inputs["attention_mask"] is None
    params = inputs["packed_seq_params"]
    assert params.qkv_format == "thd" and params.max_seqlen_q == params.max_seqlen_kv == 16
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_q.tolist() == [0, 13, 29, 40, 55]
    assert params.cu_seqlens_kv_padded.tolist() == [0, 13, 29, 40, 56]


def test_the_sampler_switches_attention_to_the_explicit_mask_and_back(single_rank):
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.enums import AttnMaskType

    from distributed_helpers import random_tiny_gpt
    from nemo_rlsr.generation.torch_sampler import explicit_mask_attention

    module = random_tiny_gpt(tiny_model_config(), VOCAB)
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    assert len(layers) == 2 and {m.attn_mask_type for m in layers} == {AttnMaskType.causal}
    with explicit_mask_attention(module):
        assert {m.attn_mask_type for m in layers} == {AttnMaskType.arbitrary}
    assert {m.attn_mask_type for m in layers} == {AttnMaskType.causal}


def test_planner_counts_the_fallback_scores_on_the_te_spec_and_none_for_thd():
    """Qwen2.5-7B at TP2, 4096 tokens (its recipe, a GPU plan: the TE profile): THD keeps no score
    matrix; the `arbitrary` fallback keeps each layer's bf16 probabilities (heads / TP x T x T per
    row) plus two working copies of the layer being computed, hand-computed here."""
    from distributed_helpers import REPO_ROOT
    from nemo_rlsr.config import load_config
    from nemo_rlsr.planner import make_plan

    plans = {layout: make_plan(load_config(REPO_ROOT / "conf/rlsr_qwen7b_sb.yaml", [f"model.attention_layout={layout}"]))
             for layout in ("auto", "thd", "mask")}
    m, lay = plans["mask"].cfg.model, plans["mask"].layout
    assert (lay.tp, lay.pp, lay.cp, m.max_sequence_length, m.recompute_granularity) == (2, 1, 1, 4096, None)
    per_layer = plans["mask"].cfg.grpo.micro_batch_size * 28 / 2 * 4096 * 4096 * 2  # 0.47 GB
    assert per_layer == pytest.approx(0.47e9, rel=0.01)
    fallback = plans["mask"].memory.items["activations"] - plans["auto"].memory.items["activations"]
    assert fallback == pytest.approx((m.num_layers + 2) * per_layer, rel=1e-9)
    assert plans["thd"].memory.items["activations"] == plans["auto"].memory.items["activations"]


def test_attention_layout_is_validated_with_the_config():
    from distributed_helpers import REPO_ROOT
    from nemo_rlsr.config import load_config
    from nemo_rlsr.config.rules import config_problems

    def problems(*overrides):
        cfg = load_config(REPO_ROOT / "conf/rlsr_tiny.yaml", list(overrides))
        return [p for p in config_problems(cfg, "rlsr") if "attention_layout" in p]

    assert problems("model.attention_layout=thd") == []
    assert "choose one of auto, thd, mask" in problems("model.attention_layout=flash")[0]
    assert "not built" in problems("model.attention_layout=thd", "parallel.context_parallel=2")[0]
    assert problems("model.attention_layout=auto", "parallel.context_parallel=2") == []
