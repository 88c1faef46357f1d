"""Llama-3.x RoPE frequency scaling ("llama3" rope_type), with the checkpoint's own factors.

megatron-core's `rope_scaling` applies the same formula but with low/high frequency factors and the
original context length fixed to Llama-3.1's (1, 4, 8192); Llama-3.2 and other checkpoints set
their own, so the policy builder replaces the rotary embedding's `inv_freq` with this one.
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
