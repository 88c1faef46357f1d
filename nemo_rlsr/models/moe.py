"""Mixture-of-experts settings of our megatron-core GPTModel (Qwen3-MoE, DeepSeek-V3 style).

The choices that are not read from the model config, and why:

* No token dropping, no capacity factor: every token reaches its top-k experts, so the output is
  the HF model's exactly (a dropped token would silently change the logits).
* Load-balancing loss off (`none`, coefficient 0): RLSR fine-tunes a pretrained router with the
  GRPO loss alone; an aux loss would also make the loss differ from the HF model's. A sigmoid
  router with `moe_router_enable_expert_bias` still balances through megatron's bias updates
  (DeepSeek-V3's aux-loss-free balancing), which only move the routing, not the logits' math.
* Router logits in fp32 (`moe_router_dtype`): top-k ties under bf16 would flip routes.
* Token dispatcher: `alltoall` on GPUs; `allgather` on CPU, because gloo's `all_to_all_single`
  rejects the uneven split sizes megatron's all-to-all dispatcher passes. Both compute the same sums.
* Experts are a `SequentialMLP` (`moe_grouped_gemm=False`): its parameters are one linear_fc1 /
  linear_fc2 per local expert (`mlp.experts.local_experts.{i}.*`), the names the HF adapters and
  the expert-parallel mapping (hf/expert_parallel.py) use, on the local and the TE spec alike.
"""

from __future__ import annotations

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.distributed.dims import ParallelDims

ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")


def moe_layer_freq(cfg: ModelConfig) -> list[int]:
    """megatron's per-layer pattern: 0 = dense MLP (the first `moe_first_dense_layers`), 1 = MoE."""
    dense = cfg.moe_first_dense_layers
    if not 0 <= dense < cfg.num_layers:
        raise ValueError(f"model.moe_first_dense_layers={dense} must be in [0, num_layers={cfg.num_layers})")
    return [0] * dense + [1] * (cfg.num_layers - dense)


def moe_transformer_kwargs(cfg: ModelConfig, dims: ParallelDims) -> dict:
    """TransformerConfig fields of the MoE layers split as `dims`; empty for a dense model."""
    if not cfg.num_moe_experts:
        return {}
    if cfg.moe_router_score_function not in ROUTER_SCORE_FUNCTIONS:
        raise ValueError(f"model.moe_router_score_function={cfg.moe_router_score_function!r}: choose one of "
                         f"{', '.join(ROUTER_SCORE_FUNCTIONS)}")
    if cfg.num_moe_experts % dims.ep:
        raise ValueError(f"model.num_moe_experts={cfg.num_moe_experts} is not divisible by expert_parallel={dims.ep}")
    return {
        "num_moe_experts": cfg.num_moe_experts,
        "moe_router_topk": cfg.moe_router_topk,
        "moe_ffn_hidden_size": cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
        "moe_layer_freq": moe_layer_freq(cfg),
        "moe_router_score_function": cfg.moe_router_score_function,
        "moe_router_pre_softmax": cfg.moe_router_pre_softmax,
        "moe_router_enable_expert_bias": cfg.moe_router_enable_expert_bias,
        "moe_router_num_groups": cfg.moe_router_num_groups,
        "moe_router_group_topk": cfg.moe_router_group_topk,
        "moe_router_topk_scaling_factor": cfg.moe_router_topk_scaling_factor,
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_router_dtype": "fp32",
        "moe_token_dispatcher_type": "alltoall" if torch.cuda.is_available() else "allgather",
        "moe_grouped_gemm": False,
        "moe_permute_fusion": False,
        "expert_model_parallel_size": dims.ep,
        "expert_tensor_parallel_size": dims.etp,
    }


def decoder_block_spec(config, use_transformer_engine: bool = False, vp_stage: int | None = None):
    """megatron's per-layer block spec of an MoE and/or MLA model, for this pipeline stage's layers.

    Everything is read from the TransformerConfig: the dense or MoE MLP of each layer
    (`moe_layer_freq`), MLA, qk-norm (for MLA: the q/kv latent norms). A single layer spec cannot
    express DeepSeek-V3's first dense layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from nemo_rlsr.compat.megatron import with_local_mla_attention

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine, normalization="RMSNorm",
                                      vp_stage=vp_stage)  # interleaved pipeline: this chunk's layers
    if config.multi_latent_attention and not use_transformer_engine:
        for layer in spec.layer_specs:
            with_local_mla_attention(layer)
    return spec
