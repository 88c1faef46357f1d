"""The TE layer spec's attention gets `attn_mask_type=arbitrary` (models/spec.py): TE ignores the
mask of a `causal` attention, and our batches' masks (left-padded prompts, packed segments) must
apply. TE cannot run here: the spec rewrite is checked on megatron's local specs, dense and
MoE + MLA, and a local model built from the rewritten spec gives the causal one's logits (our mask
carries the causal part itself, which is what `arbitrary` relies on)."""

from __future__ import annotations

import dataclasses

import torch

from nemo_rlsr.config import ModelConfig
from tests.distributed_helpers import VOCAB, random_tiny_gpt, tiny_model_config, token_batch


def mask_types(spec) -> list:
    from megatron.core.transformer.spec_utils import ModuleSpec

    found = []
    if isinstance(spec, list):
        for item in spec:
            found += mask_types(item)
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        if isinstance(spec, ModuleSpec) and "attn_mask_type" in spec.params:
            found.append(spec.params["attn_mask_type"])
        for field in dataclasses.fields(spec):
            found += mask_types(getattr(spec, field.name))
    return found


MLA_MOE = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, max_sequence_length=32,
                      num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_first_dense_layers=1,
                      multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16,
                      qk_pos_emb_head_dim=8, v_head_dim=16)


def test_every_attention_of_dense_and_moe_mla_specs_gets_the_arbitrary_mask(single_rank):
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_rlsr.models.gpt import dense_layer_spec, transformer_config
    from nemo_rlsr.models.moe import decoder_block_spec
    from nemo_rlsr.models.spec import with_attention_mask_type

    for spec, layers in ((dense_layer_spec(tiny_model_config(), te=False), 1),
                         (decoder_block_spec(transformer_config(MLA_MOE, 1, 1), False), MLA_MOE.num_layers)):
        assert mask_types(spec) == [AttnMaskType.causal] * layers
        rewritten = with_attention_mask_type(spec, AttnMaskType.arbitrary)
        assert mask_types(rewritten) == [AttnMaskType.arbitrary] * layers
        assert mask_types(spec) == [AttnMaskType.causal] * layers  # megatron's spec objects untouched


def test_local_model_with_arbitrary_mask_type_gives_the_causal_logits(single_rank, monkeypatch):
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_rlsr.models import gpt
    from nemo_rlsr.models.policy import attention_mask, position_ids
    from nemo_rlsr.models.spec import with_attention_mask_type

    batch = token_batch()  # left-padded rows
    assert not batch.valid.all()

    def logits(model):
        with torch.no_grad():
            return model(batch.input_ids, position_ids(batch.input_ids), attention_mask(batch.valid))

    causal = random_tiny_gpt(tiny_model_config(), VOCAB)
    local_spec = gpt.dense_layer_spec
    monkeypatch.setattr(gpt, "dense_layer_spec",
                        lambda cfg, te: with_attention_mask_type(local_spec(cfg, te), AttnMaskType.arbitrary))
    arbitrary = random_tiny_gpt(tiny_model_config(), VOCAB)
    assert arbitrary.decoder.layers[0].self_attention.core_attention.attn_mask_type == AttnMaskType.arbitrary
    valid = batch.valid[:, :, None]
    assert torch.equal(logits(arbitrary).masked_fill(~valid, 0), logits(causal).masked_fill(~valid, 0))
