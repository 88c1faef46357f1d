"""Which of megatron-core's fused kernels the policy's TransformerConfig turns on, and why.

Only on Transformer Engine's layer spec (a GPU with TE): the kernels are CUDA-only, and the local
spec is the CPU policy's, whose numbers the CPU tests pin. The rules below were read from
megatron-core's sources at core_v0.16.1 and core_v0.19.0 (same rules in both):

- `gradient_accumulation_fusion`: the weight-gradient GEMM accumulates straight into the fp32
  `main_grad` buffer that megatron's DDP gives every parameter (we always wrap the trained policy
  in it; the frozen reference only runs forward). TE's linears do it themselves
  (`fuse_wgrad_accumulation`, megatron/core/extensions/transformer_engine.py), but the output layer
  is megatron's own ColumnParallelLinear even on the TE spec, whose constructor raises unless
  APEX's `fused_weight_gradient_mlp_cuda` extension imports (megatron/core/tensor_parallel/layers.py,
  `_grad_accum_fusion_available`): on only where that extension is present.
- `apply_rope_fusion`: TE's fused RoPE (`fused_apply_rotary_pos_emb`,
  megatron/core/models/common/embeddings/rope_utils.py; TransformerConfig.__post_init__ raises
  without it). Off for multi-latent attention (megatron: training only, experimental, YaRN only,
  and our samplers run the same module for inference) and for YaRN RoPE (its mscale != 1 makes
  `apply_rotary_pos_emb` fall back to the unfused kernel with a warning anyway).
- `moe_grouped_gemm`: stays off (models/moe.py). On the TE spec it swaps the experts' SequentialMLP
  for TEGroupedMLP (megatron/core/models/gpt/gpt_layer_specs.py), whose weights are one
  `linear_fc1.weight{i}` per expert instead of `local_experts.{i}.linear_fc1.weight`: the HF
  adapters, the refit stream and our checkpoints name experts the SequentialMLP way.
"""

from __future__ import annotations

import importlib.util

from nemo_rlsr.config import ModelConfig


def wgrad_accumulation_kernel_available() -> bool:
    """APEX's fused weight-gradient extension, which megatron's ColumnParallelLinear needs for
    gradient_accumulation_fusion (NGC PyTorch images ship it; PyPI's `apex` is unrelated)."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def fusion_flags(cfg: ModelConfig, te_spec: bool, wgrad_kernel: bool) -> dict[str, bool]:
    """TransformerConfig's fusion fields for `cfg` on the TE spec (`te_spec`) or the local one;
    `wgrad_kernel`: whether wgrad_accumulation_kernel_available()."""
    yarn = cfg.yarn_scaling_factor is not None
    return {
        "gradient_accumulation_fusion": te_spec and wgrad_kernel,
        "apply_rope_fusion": te_spec and not cfg.multi_latent_attention and not yarn,
    }
