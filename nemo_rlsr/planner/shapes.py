"""Parameter counts and per-token tensor sizes of a config's model, as megatron-core builds it.

Counts follow megatron's GPT layer layout: fused QKV (+ bias), output projection, two RMSNorm
weights, SwiGLU MLP (fc1 holds gate and up), or for MoE layers a router, routed experts and
shared experts; MLA replaces QKV by down/up projections with their own norms. The tiny config's
count is checked against the real megatron model in tests/test_planner.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nemo_rlsr.config import ModelConfig


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """megatron's padded vocabulary as nemo_rlsr.models.gpt pads it at TP=1 (a multiple of 128).

    Restated, not imported: that module imports torch, and the planner runs on login nodes and in
    the launcher's preflight, where it should start in a fraction of a second. tests/test_planner.py
    checks the two agree.
    """
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True)
class ModelShape:
    cfg: ModelConfig
    vocab: int  # padded as megatron pads it
    hf_vocab: int = 0  # the tokenizer's (HF tensors and a refit carry these rows); 0: = vocab

    @classmethod
    def build(cls, cfg: ModelConfig, vocab_size: int) -> "ModelShape":
        return cls(cfg, padded_vocab_size(vocab_size), vocab_size)

    # ---- dimensions ----------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.cfg.kv_channels or self.cfg.hidden_size // self.cfg.num_attention_heads

    @property
    def q_dim(self) -> int:
        """Width of the attention output (heads x value head dim)."""
        c = self.cfg
        return c.num_attention_heads * (c.v_head_dim if c.multi_latent_attention else self.head_dim)

    @property
    def kv_heads(self) -> int:
        return self.cfg.num_query_groups or self.cfg.num_attention_heads

    @property
    def kv_dim(self) -> int:
        """Width of K (= of V) for GQA/MHA."""
        return self.kv_heads * self.head_dim

    def is_moe_layer(self, index: int) -> bool:
        return bool(self.cfg.num_moe_experts) and index >= self.cfg.moe_first_dense_layers

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.cfg.num_layers))

    # ---- parameters ----------------------------------------------------------------------------

    def attention_params(self) -> int:
        c, h = self.cfg, self.cfg.hidden_size
        if c.multi_latent_attention:
            heads, qk = c.num_attention_heads, c.qk_head_dim + c.qk_pos_emb_head_dim
            q = h * heads * qk if c.q_lora_rank is None else h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * qk
            kv = h * (c.kv_lora_rank + c.qk_pos_emb_head_dim) + c.kv_lora_rank
            kv += c.kv_lora_rank * heads * (c.qk_head_dim + c.v_head_dim)
            return q + kv + self.q_dim * h
        qkv_out = self.q_dim + 2 * self.kv_dim
        return h * qkv_out + (qkv_out if c.add_qkv_bias else 0) + self.q_dim * h

    def dense_mlp_params(self) -> int:
        return 3 * self.cfg.hidden_size * self.cfg.ffn_hidden_size

    def expert_params(self) -> int:
        """All routed experts of one MoE layer (what expert parallelism shards)."""
        c = self.cfg
        return c.num_moe_experts * 3 * c.hidden_size * (c.moe_ffn_hidden_size or c.ffn_hidden_size)

    def moe_dense_params(self) -> int:
        """Router and shared experts of one MoE layer (replicated across expert-parallel ranks)."""
        c = self.cfg
        return c.num_moe_experts * c.hidden_size + 3 * c.hidden_size * (c.moe_shared_expert_intermediate_size or 0)

    def layer_params(self, index: int) -> tuple[int, int]:
        """(dense, expert) parameters of layer `index`; dense includes its two norm weights."""
        dense = self.attention_params() + 2 * self.cfg.hidden_size
        if self.is_moe_layer(index):
            return dense + self.moe_dense_params(), self.expert_params()
        return dense + self.dense_mlp_params(), 0

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.cfg.hidden_size

    @property
    def output_params(self) -> int:
        return 0 if self.cfg.tie_embeddings else self.vocab * self.cfg.hidden_size

    def total_params(self) -> int:
        layers = sum(sum(self.layer_params(i)) for i in range(self.cfg.num_layers))
        return layers + self.embedding_params + self.output_params + self.cfg.hidden_size

    def hf_params(self) -> int:
        """Parameters of the HF checkpoint / a refit: megatron's padded vocabulary rows trimmed."""
        padding = self.vocab - (self.hf_vocab or self.vocab)
        return self.total_params() - padding * self.cfg.hidden_size * (1 if self.cfg.tie_embeddings else 2)

    def active_params(self) -> int:
        """Parameters one token passes through (MoE: top-k of the routed experts); excludes the
        input embedding, which is a lookup, not a matmul."""
        c = self.cfg
        total = self.total_params() - self.embedding_params + (self.embedding_params if c.tie_embeddings else 0)
        if c.num_moe_experts:
            total -= self.moe_layers * self.expert_params() * (c.num_moe_experts - c.moe_router_topk) // c.num_moe_experts
        return total

    # ---- per-token sizes -----------------------------------------------------------------------

    def kv_cache_elements(self) -> int:
        """Elements of KV cache one token keeps in one layer (MLA caches the compressed latent)."""
        c = self.cfg
        if c.multi_latent_attention:
            return c.kv_lora_rank + c.qk_pos_emb_head_dim
        return 2 * self.kv_dim

    def attention_flops_per_token(self, context: float) -> float:
        """Forward FLOPs (not multiply-adds) of causal attention, QK^T and AV, per token, all
        layers, at mean context: 2 x context x (qk + v head dims) per head, halved by the mask."""
        c = self.cfg
        qk = (c.qk_head_dim + c.qk_pos_emb_head_dim) if c.multi_latent_attention else self.head_dim
        per_head = 2 * context * (qk + (c.v_head_dim if c.multi_latent_attention else self.head_dim))
        return c.num_layers * c.num_attention_heads * per_head / 2  # causal: half the context


@dataclass(frozen=True)
class Encoder:
    """A reward encoder, by the size that matters to the plan."""

    name: str
    params: int
    hidden: int
    max_tokens: int  # the encoder truncates its input here
    source: str


ENCODERS = {
    "minilm-l6": Encoder("minilm-l6", 22_713_216, 384, 256, "sentence-transformers/all-MiniLM-L6-v2 model card"),
    "mpnet-base-v2": Encoder("mpnet-base-v2", 109_486_464, 768, 384, "sentence-transformers/all-mpnet-base-v2 card"),
    "qwen3-embedding-0.6b": Encoder("qwen3-embedding-0.6b", 596_000_000, 1024, 32768, "Qwen/Qwen3-Embedding-0.6B card"),
    "qwen3-embedding-4b": Encoder("qwen3-embedding-4b", 4_022_000_000, 2560, 32768, "Qwen/Qwen3-Embedding-4B card"),
    "qwen3-embedding-8b": Encoder("qwen3-embedding-8b", 7_567_000_000, 4096, 32768, "Qwen/Qwen3-Embedding-8B card"),
}


def encoder(name: str) -> Encoder:
    if name not in ENCODERS:
        raise ValueError(f"reward.encoder={name!r} is not known to the planner; known: {', '.join(ENCODERS)}")
    return ENCODERS[name]
