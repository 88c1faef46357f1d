"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention (GQA, qk-norm) with a softmax top-k router
over routed experts in every layer, no shared expert.

Router: HF takes softmax over all experts, then the top k; `norm_topk_prob` renormalizes those k
to sum to 1, which is megatron's top-k over the logits followed by a softmax over the k
(`moe_router_pre_softmax=False`); without it the k probabilities stay as they are
(`moe_router_pre_softmax=True`).
"""

from __future__ import annotations

import dataclasses

from nemo_rlsr.models.hf.adapter import require
from nemo_rlsr.models.hf.moe_mlp import MoEMixin
from nemo_rlsr.models.hf.qwen3 import Qwen3Adapter


class Qwen3MoeAdapter(MoEMixin, Qwen3Adapter):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def model_config(self, hf_config: dict):
        # every layer MoE: no `mlp_only_layers`, a sparse block at every step
        require(hf_config, "decoder_sparse_step", (1,), 1)
        if hf_config.get("mlp_only_layers"):
            raise ValueError(f"config.json mlp_only_layers={hf_config['mlp_only_layers']!r} is not supported")
        return dataclasses.replace(
            super().model_config(hf_config),
            # hub checkpoints say num_experts; transformers 5 writes num_local_experts
            num_moe_experts=hf_config.get("num_experts") or hf_config["num_local_experts"],
            moe_router_topk=hf_config["num_experts_per_tok"],
            moe_ffn_hidden_size=hf_config["moe_intermediate_size"],
            moe_router_pre_softmax=not hf_config.get("norm_topk_prob", False),
        )

    def hf_config(self, cfg):
        return super().hf_config(cfg) | {
            "num_experts": cfg.num_moe_experts,
            "num_experts_per_tok": cfg.moe_router_topk,
            "moe_intermediate_size": cfg.moe_ffn_hidden_size,
            "norm_topk_prob": not cfg.moe_router_pre_softmax,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }


ADAPTER = Qwen3MoeAdapter()
