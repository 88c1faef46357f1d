"""Build a megatron-core GPTModel (local layer spec) for the current TP/PP rank.

The tiny CPU policy uses the local (non-Transformer-Engine) spec, which runs on CPU and GPU alike.
The vocabulary is padded to a multiple of
lcm(128, TP) (megatron shards the embedding by rows); `mask_padded_vocab` keeps the padded ids out of
both sampling and the trainer's softmax so the engine's and the trainer's logprobs agree.
"""

from __future__ import annotations

import math

import torch

from nemo_rlsr.config import ModelConfig


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Round up to a multiple of lcm(`multiple`, tp).

    Not `multiple * tp` (Megatron-LM's rule): the padded size must not depend on TP, or a
    checkpoint's embedding has another global shape at another TP and cannot be resharded on load.
    128 keeps HF vocabularies (mostly multiples of 128) unpadded and every shard 16-aligned up to TP=8.
    """
    step = math.lcm(multiple, tp)
    return int(math.ceil(vocab_size / step) * step)


def transformer_config(cfg: ModelConfig, tp: int, pp: int, dtype: torch.dtype = torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    if cfg.num_layers % pp != 0:
        raise ValueError(f"model.num_layers={cfg.num_layers} is not divisible by pipeline_parallel={pp}")
    if cfg.num_attention_heads % tp != 0:
        raise ValueError(
            f"model.num_attention_heads={cfg.num_attention_heads} is not divisible by tensor_parallel={tp}"
        )
    config = TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        # Fused kernels are CUDA-only; the unfused paths compute the same math.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        # Loss is summed per token and divided by the global valid-token count in finalize_model_grads.
        calculate_per_token_loss=True,
        # gloo mis-orders batched isend/irecv (wrong grads with interleaving); NCCL is fine either way.
        batch_p2p_comm=torch.cuda.is_available(),
    )
    return config


def build_gpt(cfg: ModelConfig, vocab_size: int, tp: int = 1, pp: int = 1):
    """The GPTModel chunk for this rank's pipeline stage (vocab padded for TP)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = GPTModel(
        config=transformer_config(cfg, tp, pp),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=padded_vocab_size(vocab_size, tp),
        max_sequence_length=cfg.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
    )
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
