"""megatron's fused kernels (models/fusions.py): on the TE spec where megatron allows them, never on
the local spec; and the library rules they rest on, shown where they can run (no TE, no APEX here)."""

from __future__ import annotations

import dataclasses

import pytest

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.models.fusions import fusion_flags, wgrad_accumulation_kernel_available
from nemo_rlsr.models.gpt import transformer_config

DENSE = ModelConfig(transformer_impl="local")
MLA = dataclasses.replace(DENSE, multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=16,
                          qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)
YARN = dataclasses.replace(DENSE, yarn_scaling_factor=4.0)


@pytest.mark.parametrize("cfg", [DENSE, MLA, YARN], ids=["dense", "mla", "yarn"])
def test_the_local_spec_builds_a_config_without_fusions(cfg):
    config = transformer_config(cfg)
    assert not config.gradient_accumulation_fusion and not config.apply_rope_fusion and not config.moe_grouped_gemm


@pytest.mark.parametrize(("cfg", "wgrad_kernel", "expected"), [
    (DENSE, True, {"gradient_accumulation_fusion": True, "apply_rope_fusion": True}),
    (DENSE, False, {"gradient_accumulation_fusion": False, "apply_rope_fusion": True}),  # no APEX extension
    (MLA, True, {"gradient_accumulation_fusion": True, "apply_rope_fusion": False}),  # MLA: training-only fused RoPE
    (YARN, True, {"gradient_accumulation_fusion": True, "apply_rope_fusion": False}),  # mscale: unfused anyway
], ids=["dense", "dense-no-apex", "mla", "yarn"])
def test_the_te_spec_turns_on_what_megatron_allows(cfg, wgrad_kernel, expected):
    assert fusion_flags(cfg, te_spec=True, wgrad_kernel=wgrad_kernel) == expected
    assert fusion_flags(cfg, te_spec=False, wgrad_kernel=wgrad_kernel) == dict.fromkeys(expected, False)


def test_the_rules_megatron_enforces_without_the_kernels(single_rank):
    """Why each flag needs its kernel: without TE megatron refuses fused RoPE at config time, and
    without APEX's extension its ColumnParallelLinear (our output layer, on either spec) refuses
    gradient accumulation fusion (core_v0.16.1 transformer_config.py / tensor_parallel/layers.py)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    if wgrad_accumulation_kernel_available():
        pytest.skip("APEX's fused_weight_gradient_mlp_cuda is installed here")
    config = transformer_config(DENSE)
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        ColumnParallelLinear(8, 8, config=dataclasses.replace(config, gradient_accumulation_fusion=True),
                             init_method=config.init_method, bias=False)
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="apply_rope_fusion is not available"):
            dataclasses.replace(config, apply_rope_fusion=True)
