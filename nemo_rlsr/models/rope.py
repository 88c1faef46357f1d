"""RoPE scaling of HF checkpoints: Llama-3.x ("llama3") and YaRN ("yarn").

llama3: megatron-core's `rope_scaling` applies the same formula but with low/high frequency factors
and the original context length fixed to Llama-3.1's (1, 4, 8192); Llama-3.2 and other checkpoints
set their own, so the policy builder replaces the rotary embedding's `inv_freq` with this one.

YaRN: megatron-core's `YarnRotaryEmbedding` computes transformers' frequencies (the same ramp between
`beta_fast` and `beta_slow` rotations, rounded outwards) and multiplies cos/sin by a factor from
`factor`, `mscale`, `mscale_all_dim`. Only that factor is derived differently, so these helpers
pick megatron's arguments that give transformers' value:

* transformers: mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set and
  non-zero, else mscale(factor, 1);
* megatron dense GPT (`yarn_*` attributes of the TransformerConfig, read by GPTModel and the
  attention): the same ratio, or mscale(factor, 1) when either is None;
* megatron MLA (MLATransformerConfig fields, floats): always the ratio, and the softmax scale
  multiplied by mscale(factor, mscale_all_dim)^2, which is transformers' DeepSeek-V3 scale.
"""

from __future__ import annotations

import math

import torch


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position: int) -> torch.Tensor:
    """Long wavelengths (> original context / low_freq_factor) are divided by `factor`, short ones
    (< original context / high_freq_factor) kept, and the band between interpolated smoothly."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, interpolated, scaled)


def mla_yarn_mscales(mscale: float | None, mscale_all_dim: float | None) -> tuple[float, float]:
    """MLATransformerConfig (mscale, mscale_all_dim) computing transformers' DeepSeek-V3 attention
    (see the module docstring): as given when both are set, else (1, 0), i.e. a cos/sin factor of
    mscale(factor, 1) and an unscaled softmax. mscale_all_dim alone scales transformers' softmax
    while its cos/sin factor ignores it, which megatron's MLA cannot express."""
    if mscale and mscale_all_dim:
        return float(mscale), float(mscale_all_dim)
    if mscale_all_dim:
        raise ValueError(f"YaRN mscale_all_dim={mscale_all_dim} without mscale is not supported (megatron's MLA "
                         "derives the cos/sin factor from both; transformers then uses factor alone)")
    return 1.0, 0.0


def gpt_yarn_attributes(cfg) -> dict:
    """The `yarn_*` attributes megatron-core's GPTModel (position_embedding_type="yarn") and its
    attention read from the TransformerConfig; empty without YaRN, or with MLA (which takes YaRN in
    its own config fields, models/mla.py). `cfg` is a ModelConfig."""
    if cfg.yarn_scaling_factor is None or cfg.multi_latent_attention:
        return {}
    if cfg.rope_scaling_factor is not None:
        raise ValueError("model.yarn_scaling_factor and model.rope_scaling_factor (llama3) are both set")
    if cfg.rotary_percent != 1.0:  # megatron's YarnRotaryEmbedding spans the whole head dim
        raise ValueError(f"YaRN with model.rotary_percent={cfg.rotary_percent} is not supported (only 1.0)")
    both = bool(cfg.yarn_mscale and cfg.yarn_mscale_all_dim)
    return {
        "yarn_rotary_scaling_factor": cfg.yarn_scaling_factor,
        "yarn_original_max_position_embeddings": cfg.yarn_original_max_position,
        "yarn_beta_fast": cfg.yarn_beta_fast,
        "yarn_beta_slow": cfg.yarn_beta_slow,
        "yarn_mscale": cfg.yarn_mscale if both else None,
        "yarn_mscale_all_dim": cfg.yarn_mscale_all_dim if both else None,
        "yarn_correction_range_round_to_int": True,  # transformers' `truncate` (adapters refuse false)
    }
