"""Layer norms of megatron's local (non-Transformer-Engine) layer spec that work under sequence parallelism.

megatron's local spec builds its norms with `WrappedTorchNorm`, which refuses
`config.sequence_parallel` (megatron-core 0.16 and 0.19 alike). Under sequence parallelism each TP
rank normalises its own slice of the sequence, so a norm weight's gradient on one rank covers only
that slice: the full gradient is the SUM over the TP group. megatron's `finalize_model_grads` does
that sum for every parameter tagged `sequence_parallel=True` (what TE's and apex's norms tag).

`SequenceParallelNorm` is the same `torch.nn.RMSNorm` / `torch.nn.LayerNorm` that WrappedTorchNorm
returns (parameter names `weight` / `bias`, so HF adapters and checkpoints are unchanged), with its
parameters tagged. `with_sequence_parallel_norms` puts it into a local spec in place of every
WrappedTorchNorm: the layers' input / pre-MLP norms, qk-norms, MLA's latent norms, and the block's
final norm (which megatron takes from the block spec, or, for a single layer spec, from
`transformer_block.LayerNormImpl`: such a spec is turned into a block spec here first).
"""

from __future__ import annotations

import torch

from nemo_rlsr.models.spec import replace_module


class SequenceParallelNorm:
    """RMSNorm or LayerNorm (per `config.normalization`) whose parameters carry
    `sequence_parallel=config.sequence_parallel`. A class with `__new__`, like WrappedTorchNorm:
    megatron's `build_module` (0.16) instantiates classes but returns plain functions as they are,
    and 0.19 calls the spec entry with keyword arguments; both get a plain torch module back."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused_megatron_options) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the local spec's torch norms")
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization={config.normalization!r}: the local spec builds {', '.join(norms)}")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(spec, config, vp_stage: int | None = None):
    """`spec` (a local layer ModuleSpec or block spec) with `SequenceParallelNorm` for every
    WrappedTorchNorm, final norm included. A new spec tree: megatron's spec objects are left as
    they are. A layer spec becomes the block spec megatron would build from it (this stage's layers)."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if isinstance(spec, ModuleSpec):  # one layer spec: what megatron's TransformerBlock makes of it
        layers = transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage)
        spec = transformer_block.TransformerBlockSubmodules(layer_specs=[spec] * layers,
                                                            layer_norm=transformer_block.LayerNormImpl)

    return replace_module(spec, WrappedTorchNorm, SequenceParallelNorm)
