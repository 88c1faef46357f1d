"""Multi-latent attention (DeepSeek-V2/V3, Kimi-K2) in our megatron-core GPTModel.

* Config: megatron's `MLATransformerConfig` with plain RoPE (`rope_type="rope"`; the scaling
  factor 1 keeps megatron's softmax scale at 1/sqrt(qk_head_dim + qk_pos_emb_head_dim), HF's) or
  YaRN (`rope_type="yarn"`, DeepSeek-V3 / Kimi-K2: the rope dims' frequencies and cos/sin factor,
  and the softmax scale times mscale(factor, mscale_all_dim)^2, as HF's; models/rope.py).
  Megatron applies RoPE to the rope part of q and k after de-interleaving the pairs
  (`x[0::2] ++ x[1::2]`), which is HF's `rope_interleave=True` computation.
* Local spec: megatron-core 0.16's local spec puts the plain `DotProductAttention` under MLA, which
  does not take the `k_channels` / `v_channels` MLA passes (TypeError at build time), and sizes its
  output by `kv_channels`. `MLADotProductAttention` accepts them and sizes the output by the value
  head dim; the attention math (baddbmm over whatever head dim q and k have) is unchanged. The TE
  spec's attention takes both natively.
* Tensor-parallel gradients, local spec (megatron-core 0.16.1 and 0.19 alike; tests/test_mla_tensor_parallel.py):
  - The local spec's down projections are ColumnParallelLinears: their outputs are all-gathered
    over TP (`gather_from_tensor_model_parallel_region`, whose backward only keeps this rank's
    columns of the gradient, assuming every rank holds the whole one). For the q and kv latents it
    does: their up projections all-reduce the gradient of their input. The shared rope key
    (`k_pos_emb`, the last `qk_pos_emb_head_dim` columns) goes to the heads directly, so each rank's
    gradient holds only its own heads' part and the other ranks' parts are dropped: wrong
    `linear_kv_down_proj` rows and a wrong gradient into every earlier layer (at TP=2, a few %
    per parameter), with or without sequence parallelism. `LocalMLASelfAttention` sums the
    gradient of the keys' rope part over TP: every local head's rope key is the same copy of
    `k_pos_emb`, so the sum over local heads of the summed gradients is the sum over all heads.
  - With `qk_layernorm`, megatron's `finalize_model_grads` sums every `*q_layernorm*` /
    `*k_layernorm*` gradient over TP (right for per-head qk-norms, whose heads are split over TP).
    MLA's q latent norm acts on the replicated latent: without sequence parallelism every rank
    already holds the whole gradient, and the sum doubles it at TP=2. `average_latent_norm_grads`
    marks it for megatron's TP average instead (the average of equal gradients is the gradient).
    Under sequence parallelism each rank holds its part of the sequence and the sum is right
    (`kv_layernorm` matches neither name: reduced under sequence parallelism only, which is right).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.utils import get_pg_size

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.rope import mla_yarn_mscales


def mla_transformer_kwargs(cfg: ModelConfig) -> dict:
    """MLATransformerConfig fields; empty without multi-latent attention."""
    if not cfg.multi_latent_attention:
        return {}
    return {
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_head_dim": cfg.qk_head_dim,
        "qk_pos_emb_head_dim": cfg.qk_pos_emb_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rotary_base": cfg.rotary_base,
        **_rope_kwargs(cfg),
    }


def _rope_kwargs(cfg: ModelConfig) -> dict:
    if cfg.yarn_scaling_factor is None:
        return {"rope_type": "rope", "rotary_scaling_factor": 1.0}
    mscale, mscale_all_dim = mla_yarn_mscales(cfg.yarn_mscale, cfg.yarn_mscale_all_dim)
    return {
        "rope_type": "yarn", "rotary_scaling_factor": cfg.yarn_scaling_factor,
        "original_max_position_embeddings": cfg.yarn_original_max_position,
        "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow,
        "mscale": mscale, "mscale_all_dim": mscale_all_dim,
    }


class MLADotProductAttention(DotProductAttention):
    """The local core attention with MLA's separate q/k and v head dims (see the module docstring)."""

    def __init__(self, config, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
        if v_channels is not None:
            config = copy.copy(config)  # the output width is heads * v_channels; the model's config is untouched
            config.kv_channels = v_channels
        super().__init__(config, *args, **kwargs)


def with_local_mla_attention(spec):
    """A local layer spec whose MLA is `LocalMLASelfAttention` with `MLADotProductAttention`."""
    spec.submodules.self_attention.module = LocalMLASelfAttention
    spec.submodules.self_attention.submodules.core_attention = MLADotProductAttention
    return spec


class _SumRopeKeyGradOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient of the keys' rope columns (after the first
    `nope_dim`) over the TP group (see the module docstring)."""

    @staticmethod
    def forward(ctx, key: torch.Tensor, nope_dim: int, group) -> torch.Tensor:
        ctx.nope_dim, ctx.group = nope_dim, group
        return key

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rope = grad[..., ctx.nope_dim:].contiguous()
        dist.all_reduce(rope, group=ctx.group)
        return torch.cat([grad[..., :ctx.nope_dim], rope], dim=-1), None, None


class LocalMLASelfAttention(MLASelfAttention):
    """megatron's MLASelfAttention with the rope key's gradient summed over TP, for the local spec's
    column-parallel down projections (see the module docstring)."""

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, value, *latents = super().get_query_key_value_tensors(*args, **kwargs)
        if key.requires_grad and get_pg_size(self.tp_group) > 1:
            key = _SumRopeKeyGradOverTP.apply(key, self.config.qk_head_dim, self.tp_group)
        return (query, key, value, *latents)


def average_latent_norm_grads(model: torch.nn.Module) -> None:
    """Mark MLA's q latent norm for megatron's TP average of its gradient instead of the TP sum
    `finalize_model_grads` gives `*q_layernorm*` under `qk_layernorm` (see the module docstring);
    only without sequence parallelism, where every TP rank holds the whole gradient."""
    config = model.config
    if not config.multi_latent_attention or config.sequence_parallel or config.tensor_model_parallel_size == 1:
        return
    for name, param in model.named_parameters():
        if "self_attention.q_layernorm." in name:
            param.average_gradients_across_tp_domain = True


def patch_mla_without_te() -> None:
    """Without Transformer Engine, megatron-core 0.16 still sets `HAVE_TE` in its MLA module (its TE
    extension imports, with mock classes) and then calls `isinstance(linear_proj, <mock>)`, a
    TypeError at build time. Tell it the truth when `transformer_engine.pytorch` does not import."""
    from megatron.core.transformer import multi_latent_attention

    from nemo_rlsr.models.precision import installed_te_version

    if installed_te_version() is None:
        multi_latent_attention.HAVE_TE = False
