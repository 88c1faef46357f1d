"""The MoE MLP's tensors, megatron <-> HF, shared by the Qwen3-MoE and DeepSeek-V3 adapters.

Megatron (SequentialMLP experts, see models/moe.py), per layer, GLOBAL expert index e:

    mlp.router.weight                                 <-> mlp.gate.weight
    mlp.router.expert_bias (a buffer, routing only)   <-> mlp.gate.e_score_correction_bias
    mlp.experts.local_experts.{e}.linear_fc1.weight   <-> [experts.{e}.gate_proj; experts.{e}.up_proj]
    mlp.experts.local_experts.{e}.linear_fc2.weight   <-> mlp.experts.{e}.down_proj.weight
    mlp.shared_experts.linear_fc1.weight              <-> [shared_experts.gate_proj; shared_experts.up_proj]
    mlp.shared_experts.linear_fc2.weight              <-> mlp.shared_experts.down_proj.weight

HF checkpoints on disk (and transformers 5's `save_pretrained`) keep one tensor per expert, even
though transformers 5 fuses them into 3-D tensors in memory; these are the names read and written.
Which rank holds which expert (local -> global index) is hf/expert_parallel.py's business.
"""

from __future__ import annotations

import re

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.hf.adapter import Read
from nemo_rlsr.models.hf.fused import fuse_glu, split_glu

_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_SHARED = re.compile(r"^mlp\.shared_experts\.linear_fc([12])\.weight$")
# Buffers (not parameters) that are model weights: a sigmoid router's expert bias decides routes.
CHECKPOINT_BUFFERS = ("mlp.router.expert_bias",)
_ROUTER = {"mlp.router.weight": "mlp.gate.weight", "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias"}


def _mlp_prefix(suffix: str) -> str | None:
    """HF prefix of the gated MLP a megatron expert / shared-expert tensor belongs to, else None."""
    if match := _EXPERT.match(suffix):
        return f"mlp.experts.{match[1]}."
    if _SHARED.match(suffix):
        return "mlp.shared_experts."
    return None


class MoEMixin:
    """Adds the MoE MLP to an adapter's `layer_from_hf` / `layer_to_hf` (other tensors: super())."""

    def layer_from_hf(self, cfg: ModelConfig, suffix: str, read: Read) -> torch.Tensor:
        if suffix in _ROUTER:
            return read(_ROUTER[suffix])
        prefix = _mlp_prefix(suffix)
        if prefix is None:
            return super().layer_from_hf(cfg, suffix, read)
        if suffix.endswith("linear_fc1.weight"):
            return fuse_glu(read(prefix + "gate_proj.weight"), read(prefix + "up_proj.weight"))
        return read(prefix + "down_proj.weight")

    def layer_to_hf(self, cfg: ModelConfig, suffix: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if suffix in _ROUTER:
            return {_ROUTER[suffix]: tensor}
        prefix = _mlp_prefix(suffix)
        if prefix is None:
            return super().layer_to_hf(cfg, suffix, tensor)
        if suffix.endswith("linear_fc1.weight"):
            gate, up = split_glu(tensor)
            return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up}
        return {prefix + "down_proj.weight": tensor}
