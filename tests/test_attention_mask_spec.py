"""The TE layer spec's attention gets `attn_mask_type=arbitrary` (models/spec.py): TE ignores the
mask of a `causal` attention, and our batches' masks (left-padded prompts, packed segments) must
apply. TE cannot run here: the spec rewrite is checked on megatron's local specs, dense and
MoE + MLA, and our mask is checked to carry the causal part itself, which `arbitrary` relies on."""

from __future__ import annotations

import dataclasses

import torch

from nemo_rlsr.config import ModelConfig
from tests.distributed_helpers import tiny_model_config, token_batch


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
                         (decoder_block_spec(transformer_config(MLA_MOE), False), MLA_MOE.num_layers)):
        assert mask_types(spec) == [AttnMaskType.causal] * layers
        rewritten = with_attention_mask_type(spec, AttnMaskType.arbitrary)
        assert mask_types(rewritten) == [AttnMaskType.arbitrary] * layers
        assert mask_types(spec) == [AttnMaskType.causal] * layers  # megatron's spec objects untouched


def test_the_policy_mask_holds_the_causal_part_itself():
    """Under `arbitrary` TE applies only the mask it is given, so ours must mask every future key
    (besides pads and other segments) on its own."""
    from nemo_rlsr.models.policy import attention_mask

    batch = token_batch()  # left-padded rows
    segments = torch.zeros_like(batch.input_ids).masked_fill(~batch.valid, -1)
    segments[:, -4:] = 1  # a second packed example at the end of every row
    length = batch.input_ids.shape[1]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    for segment_ids in (None, segments):
        mask = attention_mask(batch.valid, segment_ids)
        assert mask.shape == (len(batch), 1, length, length)
        assert mask[:, 0][:, future].all()  # every future key masked, in every row
        assert mask[:, 0, :, :][~batch.valid[:, None, :].expand(-1, length, -1)].all()  # every pad key masked
