"""Multi-latent attention (DeepSeek-V2/V3, Kimi-K2) in our megatron-core GPTModel.

* Config: megatron's `MLATransformerConfig` with plain RoPE (`rope_type="rope"`, no YaRN: the
  scaling factor 1 also makes megatron's softmax scale 1/sqrt(qk_head_dim + qk_pos_emb_head_dim),
  HF's). Megatron applies RoPE to the rope part of q and k after de-interleaving the pairs
  (`x[0::2] ++ x[1::2]`), which is HF's `rope_interleave=True` computation.
* Local spec: megatron-core 0.16's local spec puts the plain `DotProductAttention` under MLA, which
  does not take the `k_channels` / `v_channels` MLA passes (TypeError at build time), and sizes its
  output by `kv_channels`. `MLADotProductAttention` accepts them and sizes the output by the value
  head dim; the attention math (baddbmm over whatever head dim q and k have) is unchanged. The TE
  spec's attention takes both natively.
"""

from __future__ import annotations

import copy

from megatron.core.transformer.dot_product_attention import DotProductAttention

from nemo_rlsr.config import ModelConfig


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
        "rope_type": "rope",
        "rotary_scaling_factor": 1.0,
        "rotary_base": cfg.rotary_base,
    }


class MLADotProductAttention(DotProductAttention):
    """The local core attention with MLA's separate q/k and v head dims (see the module docstring)."""

    def __init__(self, config, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
        if v_channels is not None:
            config = copy.copy(config)  # the output width is heads * v_channels; the model's config is untouched
            config.kv_channels = v_channels
        super().__init__(config, *args, **kwargs)


def with_local_mla_attention(spec):
    """A local layer spec whose MLA core attention is `MLADotProductAttention`."""
    spec.submodules.self_attention.submodules.core_attention = MLADotProductAttention
    return spec


def patch_mla_without_te() -> None:
    """Without Transformer Engine, megatron-core 0.16 still sets `HAVE_TE` in its MLA module (its TE
    extension imports, with mock classes) and then calls `isinstance(linear_proj, <mock>)`, a
    TypeError at build time. Tell it the truth when `transformer_engine.pytorch` does not import."""
    from megatron.core.transformer import multi_latent_attention

    from nemo_rlsr.models.precision import installed_te_version

    if installed_te_version() is None:
        multi_latent_attention.HAVE_TE = False
