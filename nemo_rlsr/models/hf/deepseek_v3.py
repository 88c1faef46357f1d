"""DeepSeek-V3 (`DeepseekV3ForCausalLM`; Kimi-K2 has the same layout): multi-latent attention, the
first `first_k_dense_replace` layers with a dense MLP, the others an MoE with shared experts and a
sigmoid router with a routing-only score bias and group-limited top-k.

Megatron <-> HF, per layer (local spec names; the TE spec fuses the two latent norms into the up
projections as `layer_norm_weight`):

    self_attention.linear_q_down_proj   <-> self_attn.q_a_proj          (q_lora_rank set)
    self_attention.q_layernorm          <-> self_attn.q_a_layernorm
    self_attention.linear_q_up_proj     <-> self_attn.q_b_proj
    self_attention.linear_q_proj        <-> self_attn.q_proj            (q_lora_rank null)
    self_attention.linear_kv_down_proj  <-> self_attn.kv_a_proj_with_mqa  rows [kv latent; k rope]
    self_attention.kv_layernorm         <-> self_attn.kv_a_layernorm
    self_attention.linear_kv_up_proj    <-> self_attn.kv_b_proj         rows per head [k nope; v]

Same row layouts on both sides, so every tensor is a renaming. What megatron computes the same way
only under conditions, refused otherwise: `rope_interleave` (megatron's MLA always de-interleaves
the rope dims, models/mla.py), `norm_topk_prob` (megatron always renormalizes sigmoid top-k scores),
HF's group score (sum of the top 2 scores of a group) = megatron's (sum of the top
topk/topk_group), and YaRN's `mscale_all_dim` only together with `mscale` (models/rope.py).
"""

from __future__ import annotations

import dataclasses

from nemo_rlsr.models.hf.adapter import DenseAdapter, require
from nemo_rlsr.models.hf.moe_mlp import MoEMixin
from nemo_rlsr.models.rope import mla_yarn_mscales

_MLA_RENAMES = {
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
}
HF_GROUP_SCORE_TOPK = 2  # transformers' DeepseekV3TopkRouter: a group scores its top-2 experts


class DeepseekV3Adapter(MoEMixin, DenseAdapter):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"

    def model_config(self, hf_config: dict):
        require(hf_config, "attention_bias", (False,), False)
        require(hf_config, "rope_interleave", (True,), True)
        require(hf_config, "norm_topk_prob", (True,), True)
        topk, groups, group_topk = (hf_config["num_experts_per_tok"], hf_config.get("n_group") or 1,
                                    hf_config.get("topk_group") or 1)
        if groups > 1 and topk // group_topk != HF_GROUP_SCORE_TOPK:
            raise ValueError(f"config.json num_experts_per_tok={topk} / topk_group={group_topk}: megatron scores "
                             f"a group by its top {topk // group_topk} experts, transformers by its top 2")
        moe_size = hf_config["moe_intermediate_size"]
        dense = super().model_config(hf_config)
        mla_yarn_mscales(dense.yarn_mscale, dense.yarn_mscale_all_dim)  # raises when config.json is read, not at build
        return dataclasses.replace(
            dense,
            num_query_groups=None, kv_channels=None,  # MLA has its own head dims
            multi_latent_attention=True, qk_layernorm=True,  # the q / kv latent RMSNorms
            q_lora_rank=hf_config.get("q_lora_rank"), kv_lora_rank=hf_config["kv_lora_rank"],
            qk_head_dim=hf_config["qk_nope_head_dim"], qk_pos_emb_head_dim=hf_config["qk_rope_head_dim"],
            v_head_dim=hf_config["v_head_dim"],
            num_moe_experts=hf_config["n_routed_experts"], moe_router_topk=topk, moe_ffn_hidden_size=moe_size,
            moe_shared_expert_intermediate_size=moe_size * hf_config["n_shared_experts"] or None,
            moe_first_dense_layers=hf_config.get("first_k_dense_replace", 0),
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_num_groups=groups, moe_router_group_topk=group_topk,
            moe_router_topk_scaling_factor=float(hf_config.get("routed_scaling_factor", 1.0)),
        )

    def hf_config(self, cfg):
        out = super().hf_config(cfg)
        for key in ("head_dim", "mlp_bias"):
            out.pop(key)
        return out | {
            "num_key_value_heads": cfg.num_attention_heads,
            "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_head_dim, "qk_rope_head_dim": cfg.qk_pos_emb_head_dim,
            "v_head_dim": cfg.v_head_dim, "rope_interleave": True,
            "n_routed_experts": cfg.num_moe_experts, "num_experts_per_tok": cfg.moe_router_topk,
            "moe_intermediate_size": cfg.moe_ffn_hidden_size,
            "n_shared_experts": (cfg.moe_shared_expert_intermediate_size or 0) // cfg.moe_ffn_hidden_size,
            "first_k_dense_replace": cfg.moe_first_dense_layers, "norm_topk_prob": True,
            "n_group": cfg.moe_router_num_groups, "topk_group": cfg.moe_router_group_topk,
            "routed_scaling_factor": cfg.moe_router_topk_scaling_factor,
            "num_nextn_predict_layers": 0,
        }

    def layer_from_hf(self, cfg, suffix, read):
        if suffix in _MLA_RENAMES:
            return read(_MLA_RENAMES[suffix])
        return super().layer_from_hf(cfg, suffix, read)

    def layer_to_hf(self, cfg, suffix, tensor):
        if suffix in _MLA_RENAMES:
            return {_MLA_RENAMES[suffix]: tensor}
        return super().layer_to_hf(cfg, suffix, tensor)


ADAPTER = DeepseekV3Adapter()
