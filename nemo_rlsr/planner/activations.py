"""Activation memory: the tensors autograd keeps between the forward and the backward pass.

Counted tensor by tensor for the two layer implementations we run, per token and per layer:

- "local": megatron's local layer spec, used on CPU (fp32). Listed by hooking
  `torch.autograd.graph.saved_tensors_hooks` on a real step of the tiny policy: norm input,
  rsqrt, norm output (3h per norm incl. the next linear's input, two norms), the fused QKV
  output (q + 2kv), copies of q and k made by RoPE (for GQA k and v are expanded to every head),
  the softmax probabilities (heads x context: the unfused attention keeps them), the projection
  input (q), and SwiGLU's fc1 output, its two halves' intermediates and fc2's input (5 ffn).
- "te": Transformer Engine spec on GPUs (bf16; THD layout, flash attention: no heads x context term;
  under the `arbitrary` mask fallback its unfused backend keeps the probabilities, heads x context).
  LayerNormLinear keeps its input and normalised output (2h per norm), QKV output, the RoPE'd q
  and k, the attention output, fc1's output (2 ffn) and the activation's output (ffn). This is
  the same accounting as Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", ~34h bytes per token-layer) adapted to GQA and SwiGLU. Not measured here.

The loss (models/logprobs.py) keeps the logits themselves (parameter dtype; backward writes their
gradient into the same storage) and, for one chunk of `model.logprob_chunk_tokens` tokens at a
time, two fp32 vocabulary-sized temporaries: logits / temperature and their exp (8 bytes per chunk
token x local vocab entry; 4 without the entropy metric, which only RLSR's train step computes:
counted as RLSR's for every mode). For a micro-batch of several rows the output layer's
[b, s] <-> [s, b] copy of the logits can be the larger (planner/memory.logits_peak_bytes). Before
chunking the loss held five fp32 copies of the whole micro-batch's logits (20 bytes per entry;
benchmarks/logprob_memory_bench.py measures both).
"""

from __future__ import annotations

from nemo_rlsr.planner.shapes import ModelShape

# s x s score matrices of the one layer being computed, besides the probabilities each layer keeps
# (`layer_elements`): the local spec's persistent megatron buffer its baddbmm reads, the scores and
# their masked copy (forward), or the probabilities' and scores' gradients (backward); TE's unfused
# backend with its fused masked softmax: the scores and the probabilities, or their two gradients
# (TransformerEngine v2.9 transformer_engine/pytorch/attention/dot_product_attention/backends.py,
# UnfusedDotProductAttention.forward; softmax.py). Counted by planner/memory.score_working_bytes.
SCORE_WORKING_COPIES = {"local": 3, "te": 2}
LOGIT_CHUNK_BYTES = 8  # fp32 temporaries of the loss per (chunk token x local vocab entry)
MOE_IMBALANCE = 1.25  # ASSUMED: the busiest expert-parallel rank gets 25% more tokens than average


def layer_elements(shape: ModelShape, index: int, profile: str, context: int) -> tuple[float, float]:
    """(elements tensor parallelism does not split unless sequence-parallel, elements it splits)
    kept per token by layer `index`, with `context` the keys each query's score row holds: the
    softmax probabilities (heads x context) that an s x s attention keeps, 0 for TE's THD attention
    (flash / fused: no score matrix)."""
    c, h = shape.cfg, shape.cfg.hidden_size
    q, kv = shape.q_dim, shape.kv_dim
    if profile == "local":
        norms = 6 * h
        gqa = shape.kv_heads != c.num_attention_heads
        attention = (q + 2 * kv) + q + (q if gqa else kv) + (q if gqa else 0) + c.num_attention_heads * context + q
        mlp = 5 * c.ffn_hidden_size
    else:
        norms = 4 * h
        if c.multi_latent_attention:
            lora = (c.q_lora_rank or 0) * 2 + (c.kv_lora_rank + c.qk_pos_emb_head_dim) + c.kv_lora_rank
            norms += lora
            qk = c.num_attention_heads * (c.qk_head_dim + c.qk_pos_emb_head_dim)
            attention = qk + c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) + 2 * qk + q
        else:
            attention = (q + 2 * kv) + (q + kv) + q
        attention += c.num_attention_heads * context  # the `arbitrary` fallback's probabilities
        mlp = 3 * c.ffn_hidden_size
    if shape.is_moe_layer(index):
        experts = c.moe_router_topk * (h + 3 * (c.moe_ffn_hidden_size or c.ffn_hidden_size)) * MOE_IMBALANCE
        router = 2 * c.num_moe_experts  # fp32 logits, in bf16-element units
        mlp = 3 * (c.moe_shared_expert_intermediate_size or 0)
        norms += experts + router  # routed tokens follow the sequence split, not the head split
    return norms, attention + mlp


def final_elements(profile: str, hidden: int) -> float:
    """Final norm and the output layer's input (kept on the last pipeline stage)."""
    return (3 if profile == "local" else 2) * hidden
