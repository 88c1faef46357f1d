"""Multi-latent attention (DeepSeek-V2/V3, Kimi-K2) in our megatron-core GPTModel: its config.

* Config: megatron's `MLATransformerConfig` with plain RoPE (`rope_type="rope"`; the scaling
  factor 1 keeps megatron's softmax scale at 1/sqrt(qk_head_dim + qk_pos_emb_head_dim), HF's) or
  YaRN (`rope_type="yarn"`, DeepSeek-V3 / Kimi-K2: the rope dims' frequencies and cos/sin factor,
  and the softmax scale times mscale(factor, mscale_all_dim)^2, as HF's; models/rope.py).
  Megatron applies RoPE to the rope part of q and k after de-interleaving the pairs
  (`x[0::2] ++ x[1::2]`), which is HF's `rope_interleave=True` computation.
* The layer spec is megatron's (models/moe.decoder_block_spec). On the local spec megatron's MLA
  needs three fixes, in compat/megatron.py with the megatron-core releases they apply to: a core
  attention that takes MLA's head dims (`MLADotProductAttention`), the rope key's gradient summed
  over TP (`LocalMLASelfAttention`), and the q latent norm's gradient averaged, not summed, over TP
  without sequence parallelism (`mark_gradient_reductions`); tests/test_mla_tensor_parallel.py
  checks TP=2 gradients against TP=1 with them and shows megatron's differ without them.
"""

from __future__ import annotations

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
