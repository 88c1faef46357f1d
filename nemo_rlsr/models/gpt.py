"""Build a megatron-core GPTModel for the current TP/PP rank, on Transformer Engine's layer spec or
megatron's local one (`model.transformer_impl`, `use_transformer_engine`: TE's where it imports and
a GPU is there, unless forced; the local spec runs on CPU and GPU alike, and is the CPU policy's).
The vocabulary is padded to a multiple of lcm(128, TP) (megatron shards the embedding by rows);
`mask_padded_vocab` keeps the padded ids out of both sampling and the trainer's softmax so the
engine's and the trainer's logprobs agree.
"""

from __future__ import annotations

import math

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.config.rules import attention_layout
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.models.fusions import fusion_flags, wgrad_accumulation_kernel_available
from nemo_rlsr.models.mla import mla_transformer_kwargs
from nemo_rlsr.models.moe import decoder_block_spec, moe_transformer_kwargs
from nemo_rlsr.models.precision import (
    gpu_capability,
    installed_te_version,
    mixed_precision_flags,
    te_kwargs,
    uses_te_spec,
)
from nemo_rlsr.models.rope import gpt_yarn_attributes, llama3_inv_freq
from nemo_rlsr.models.spec import with_attention_mask_type


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Round up to a multiple of lcm(`multiple`, tp).

    Not `multiple * tp` (Megatron-LM's rule): the padded size must not depend on TP, or a
    checkpoint's embedding has another global shape at another TP and cannot be resharded on load.
    128 keeps HF vocabularies (mostly multiples of 128) unpadded and every shard 16-aligned up to TP=8.
    """
    step = math.lcm(multiple, tp)
    return int(math.ceil(vocab_size / step) * step)


def transformer_config(cfg: ModelConfig, dims: ParallelDims = ParallelDims()):
    """megatron's TransformerConfig of `cfg` split as `dims` (parameters in `cfg.params_dtype`)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    if cfg.num_layers % dims.pp != 0 and not dims.uneven_stages:  # uneven splits: megatron checks them
        raise ValueError(f"model.num_layers={cfg.num_layers} is not divisible by pipeline_parallel={dims.pp}")
    if cfg.num_attention_heads % dims.tp != 0:
        raise ValueError(
            f"model.num_attention_heads={cfg.num_attention_heads} is not divisible by tensor_parallel={dims.tp}"
        )
    dtype = getattr(torch, cfg.params_dtype)
    config_class = MLATransformerConfig if cfg.multi_latent_attention else TransformerConfig
    config = config_class(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        init_method_std=cfg.init_method_std,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        layernorm_epsilon=cfg.layernorm_epsilon,
        **dims.megatron_sizes(experts=False),  # the expert sizes come with the MoE fields (models/moe.py)
        # Sequence parallelism splits the sequence over TP: nothing to split at TP=1 (a no-op, as in
        # megatron's linears, which switch it off there with a warning; ParallelDims.problems refuses it).
        sequence_parallel=dims.sequence_parallel and dims.tp > 1,
        num_layers_in_first_pipeline_stage=dims.first_stage_layers,
        num_layers_in_last_pipeline_stage=dims.last_stage_layers,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        **mixed_precision_flags(dtype),  # bf16 / fp16: megatron's local attention then upcasts its softmax
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Parameters are created where the model runs. On the host they would be initialised there and
        # moved afterwards, and Transformer Engine (fp8_param) would quantize them while still on the host.
        use_cpu_initialization=not torch.cuda.is_available(),
        # Fused kernels are CUDA-only; the unfused paths compute the same math.
        bias_activation_fusion=False,
        # Never fused: our batches carry their own mask (left padding, packed rows), and for the local
        # spec's `causal` attention megatron's fused softmax (bf16/fp16 only) runs its upper-triangular
        # kernel, which ignores the mask it is given (megatron/core/fusions/fused_softmax.py,
        # forward_fused_softmax, core_v0.16.1 and core_v0.19.0).
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        # gradient_accumulation_fusion, apply_rope_fusion: on the TE spec where megatron allows them (models/fusions.py)
        **fusion_flags(cfg, use_transformer_engine(cfg), wgrad_accumulation_kernel_available()),
        # Loss is summed per token and divided by the global valid-token count in finalize_model_grads.
        calculate_per_token_loss=True,
        # gloo mis-orders batched isend/irecv (wrong grads with interleaving); NCCL is fine either way.
        batch_p2p_comm=torch.cuda.is_available(),
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        **te_kwargs(cfg),  # FP8 (models/precision.py); empty when model.fp8 is null
        **moe_transformer_kwargs(cfg, dims),  # models/moe.py; empty for a dense model
        **mla_transformer_kwargs(cfg),  # models/mla.py; empty without multi-latent attention
    )
    for name, value in gpt_yarn_attributes(cfg).items():  # YaRN: not TransformerConfig fields (models/rope.py)
        setattr(config, name, value)
    return config


def use_transformer_engine(cfg: ModelConfig) -> bool:
    """Transformer Engine's layer spec or megatron's local one, per `model.transformer_impl`
    (models/precision.uses_te_spec). Parameter names differ (the HF adapters map both)."""
    return uses_te_spec(cfg.transformer_impl, installed_te_version(), gpu_capability())


def dense_layer_spec(cfg: ModelConfig, te: bool):
    from megatron.core.models.gpt import gpt_layer_specs

    if te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")


def with_layout_mask_type(spec, cfg: ModelConfig, te: bool):
    """`spec` with the attention mask type `model.attention_layout` needs on the TE spec: under
    `mask`, `arbitrary` (TE would ignore the batch's own mask under `causal`, models/spec.py: its
    unfused fallback); under THD megatron's `causal`, which megatron's TEDotProductAttention hands TE
    as `padding_causal` with the micro-batch's cu_seqlens (core_v0.16.1
    megatron/core/extensions/transformer_engine.py; models/packed_seq.py). The local spec applies
    the mask it is given whatever the type: unchanged."""
    from megatron.core.transformer.enums import AttnMaskType

    if te and attention_layout(cfg.attention_layout, te) == "mask":
        return with_attention_mask_type(spec, AttnMaskType.arbitrary)
    return spec


def build_gpt(cfg: ModelConfig, vocab_size: int, dims: ParallelDims = ParallelDims(), vp_stage: int | None = None):
    """The GPTModel chunk of `cfg` for this rank's pipeline stage under `dims` (vocab padded for
    TP); with `dims.vpp` chunks per rank (interleaved pipeline), chunk `vp_stage` of them: its
    layers, and the embedding / output layer only on the first chunk of the first rank / the last
    chunk of the last rank. `dims.sequence_parallel`: megatron's sequence parallelism over the TP
    group (compat/megatron.py makes the local spec's norms support it). `dims.cp`: context parallelism
    (models/context_parallel.py)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from nemo_rlsr.compat.megatron import mark_gradient_reductions, patch_module_globals, with_sequence_parallel_norms
    from nemo_rlsr.models.context_parallel import with_context_parallel_attention  # imports megatron

    patch_module_globals()  # megatron-core 0.16's, before anything is built (compat/megatron.py)
    config = transformer_config(cfg, dims)
    te = use_transformer_engine(cfg)
    if cfg.num_moe_experts or cfg.multi_latent_attention:
        spec = decoder_block_spec(config, te, vp_stage)  # per-layer dense/MoE MLPs, MLA (models/moe.py)
    else:
        spec = dense_layer_spec(cfg, te)
    spec = with_layout_mask_type(spec, cfg, te)
    if not te:  # norms that support sequence parallelism (compat/megatron.py); TE's do already
        spec = with_sequence_parallel_norms(spec, config, vp_stage)
        # all-gather-KV context parallelism (models/context_parallel.py); refused on the TE spec (distributed/layout.py)
        spec = with_context_parallel_attention(spec)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        # model.vocab_size (an HF checkpoint's embedding rows) may exceed the tokenizer's `vocab_size`:
        # the rows are kept (exact HF round trip) and their ids masked like padding.
        vocab_size=padded_vocab_size(max(vocab_size, cfg.vocab_size or 0), dims.tp),
        max_sequence_length=cfg.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="yarn" if gpt_yarn_attributes(cfg) else "rope",
        rotary_base=cfg.rotary_base,
        rotary_percent=cfg.rotary_percent,
        vp_stage=vp_stage,
    )
    mark_gradient_reductions(model)  # experts at EP=1, ETP != TP; MLA's q latent norm (compat/megatron.py)
    if cfg.rope_scaling_factor is not None:  # before the first forward: megatron caches the frequencies
        rotary = model.rotary_pos_emb
        rotary.inv_freq = llama3_inv_freq(rotary.inv_freq, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                                          cfg.rope_high_freq_factor, cfg.rope_original_max_position)
    # The local spec's norms are built in fp32 whatever params_dtype says (Megatron-LM casts the whole
    # module, Float16Module); megatron's bf16 optimizer needs one dtype. Only those are cast: FP8
    # parameters (TE, fp8_param_gather) report bf16 and are left as they are.
    dtype = getattr(torch, cfg.params_dtype)
    for param in model.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    model.true_vocab_size = vocab_size
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def mask_padded_vocab(logits: torch.Tensor, true_vocab_size: int, gathered: bool = False) -> torch.Tensor:
    """Give padded vocab ids a logit whose probability is exactly 0.

    `logits` are this TP rank's vocab shard, or the whole vocabulary when `gathered`.
    A finite minimum rather than -inf keeps p*log(p) and the cross-entropy backward free of NaNs.
    """
    from megatron.core import parallel_state

    local = logits.shape[-1]
    start = 0 if gathered else parallel_state.get_tensor_model_parallel_rank() * local
    if start + local <= true_vocab_size:
        return logits
    ids = torch.arange(start, start + local, device=logits.device)
    return logits.masked_fill(ids >= true_vocab_size, torch.finfo(logits.dtype).min / 2)
