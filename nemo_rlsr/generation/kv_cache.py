"""The torch sampler's KV cache: rotated keys and values kept per layer, attended with SDPA.

Why not megatron-core's `StaticInferenceContext`: it caches keys *before* RoPE and re-applies RoPE
to the whole cached prefix of every layer at every decode step (attention.py,
`_adjust_key_value_for_inference` then `apply_rotary_pos_emb(key, k_pos_emb[:sequence_end])`,
core_v0.16.1 and core_v0.19.2), so each new token costs a rotation of every earlier key: on the
CPU that was a third of the decode time of benchmarks/generation_bench.py's tiny model. Here the
module runs without an inference context (megatron rotates only the new tokens' keys), and, while
`KVCache.attached` is active, every layer's core attention is a `CachedAttention` that appends them
to this cache and attends the new queries to the whole cached prefix, and the model's rotary
embedding starts at the cache's offset instead of 0, and the output layer sees the last position only.

The layer's projections, norms and MLP are still megatron's own modules (TP linears, MoE, qk-norm,
qkv bias unchanged); the product softmax(QK^T)V is ours: `torch.nn.functional.scaled_dot_product_attention`
with megatron's softmax scale. So is plain RoPE's rotation (`Rope`): megatron computes cos and sin
of the table again for the query and the key of every layer (rope_utils.py `_apply_rotary_pos_emb_bshd`,
core_v0.16.1 and core_v0.19.0), 60 times per decode step for a 30-layer model; `Rope` computes them
once per forward and rotates with the same formula, so the result is bit for bit megatron's. YaRN
(its mscale), other rotary modules and TE's fused RoPE keep megatron's rotation. Not for
multi-latent attention (MLA rotates inside its own attention with its own rotary module) nor a
non-vanilla softmax (`softmax_type`): `supports(module)` says so, and the sampler then keeps
megatron's static context.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch


def supports(module: torch.nn.Module) -> bool:
    """Whether `module`'s attention can run on a `KVCache` (see the module docstring)."""
    config = module.config
    vanilla = getattr(config, "softmax_type", "vanilla") == "vanilla"
    return vanilla and not getattr(config, "multi_latent_attention", False)


class KVCache:
    """Keys (already rotated) and values of every layer, [rows, kv heads, capacity, head dim] each,
    allocated on first use; `offset` columns are filled."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.offset = 0
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rope: Rope | None = None  # this forward's rotation, when `attached` rotates plain RoPE itself
        self._mask: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write megatron's new [tokens, rows, kv heads, head dim] keys and values at `offset`;
        returns the layer's cached prefix through them, [rows, kv heads, offset + tokens, head dim]."""
        tokens, rows, heads, dim = key.shape
        if layer not in self.layers:
            self.layers[layer] = tuple(t.new_empty(rows, heads, self.capacity, t.shape[-1]) for t in (key, value))
        keys, values = self.layers[layer]
        end = self.offset + tokens
        keys[:, :, self.offset : end] = key.permute(1, 2, 0, 3)
        values[:, :, self.offset : end] = value.permute(1, 2, 0, 3)
        return keys[:, :, :end], values[:, :, :end]

    def attended(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """SDPA's mask (True = attended) for megatron's (True = not attended), inverted once per
        forward: every layer gets the same mask object."""
        if self._mask is None or self._mask[0] is not attention_mask:
            self._mask = (attention_mask, ~attention_mask)
        return self._mask[1]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Cache row i becomes old row `rows[i]`: repeated indices copy a prompt's cache into its n
        samples, a subset drops finished rows."""
        self.layers = {layer: (keys.index_select(0, rows), values.index_select(0, rows))
                       for layer, (keys, values) in self.layers.items()}

    def advance(self, tokens: int) -> None:
        self.offset += tokens

    def forward_kwargs(self) -> dict:
        """Nothing for megatron's forward: the cache is reached through the swapped modules."""
        return {}

    @contextmanager
    def attached(self, module: torch.nn.Module) -> Iterator[None]:
        """Every layer's core attention a `CachedAttention` on this cache, the model's rotary
        embedding offset to the cache's columns (plain RoPE rotated by `CachedAttention`, see the
        module docstring); megatron's modules are put back on exit."""
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.transformer.attention import Attention

        swapped = [(m, "core_attention", m.core_attention) for m in module.modules() if isinstance(m, Attention)]
        for layer, (owner, name, original) in enumerate(swapped):
            setattr(owner, name, CachedAttention(self, layer, original.config))
        if getattr(module, "rotary_pos_emb", None) is not None:
            swapped.append((module, "rotary_pos_emb", module.rotary_pos_emb))
            # exactly RoPE: YaRN (a subclass) scales cos and sin by its mscale inside megatron's
            # rotation; interleaved RoPE (never built by models/gpt.py) keeps megatron's too, and so
            # does TE's fused rotation (the TE spec, models/fusions.py): one kernel, the trainer's rounding
            rotary = module.rotary_pos_emb
            rotate_here = (type(rotary) is RotaryEmbedding and not rotary.rotary_interleaved
                           and not module.config.apply_rope_fusion)
            module.rotary_pos_emb = RotaryAtOffset(module.rotary_pos_emb, self, rotate_here)
        # Logits of the last position only (the one sampled from), as megatron's static context
        # does (`materialize_only_last_token_logits`): a prefill's other positions would cost a
        # [prompt tokens, vocabulary] product each.
        last_only = module.output_layer.register_forward_pre_hook(lambda _, args: (args[0][-1:], *args[1:]))
        try:
            yield
        finally:
            last_only.remove()
            for owner, name, original in swapped:
                setattr(owner, name, original)


class MegatronStaticCache:
    """megatron-core's `StaticInferenceContext` behind `KVCache`'s interface, for the models
    `supports` refuses (MLA): RoPE re-applied to the cached prefix every step, as described above."""

    def __init__(self, rows: int, capacity: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=capacity)

    @property
    def offset(self) -> int:
        return self.context.sequence_len_offset

    def select_rows(self, rows: torch.Tensor) -> None:
        memory = self.context.key_value_memory_dict
        for layer, (keys, values) in memory.items():  # [sequence, batch, ...]: the batch is dim 1
            memory[layer] = (keys.index_select(1, rows), values.index_select(1, rows))
        self.context.max_batch_size = len(rows)

    def advance(self, tokens: int) -> None:
        self.context.sequence_len_offset += tokens

    def forward_kwargs(self) -> dict:
        return {"inference_context": self.context}

    @contextmanager
    def attached(self, module: torch.nn.Module) -> Iterator[None]:
        yield


def new_cache(module: torch.nn.Module, rows: int, capacity: int) -> KVCache | MegatronStaticCache:
    """The cache `module` decodes on: ours where `supports` allows, else megatron's static context."""
    return KVCache(capacity) if supports(module) else MegatronStaticCache(rows, capacity)


class CachedAttention(torch.nn.Module):
    """A layer's core attention during generation: megatron's call signature (query [tokens, rows,
    heads, dim], key/value [tokens, rows, kv heads, dim], boolean mask [rows, 1, tokens, keys],
    True = not attended) and output [tokens, rows, heads x dim]; the keys are the cached prefix."""

    def __init__(self, cache: KVCache, layer: int, config) -> None:
        super().__init__()
        self.cache, self.layer, self.softmax_scale = cache, layer, config.softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self.cache.rope is not None:
            query, key = self.cache.rope(query), self.cache.rope(key)
        keys, values = self.cache.append(self.layer, key, value)
        tokens, rows, heads, dim = query.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), keys, values, attn_mask=self.cache.attended(attention_mask),
            scale=self.softmax_scale or 1.0 / math.sqrt(dim), enable_gqa=keys.shape[1] != heads)
        return out.permute(2, 0, 1, 3).reshape(tokens, rows, heads * dim)


class RotaryAtOffset(torch.nn.Module):
    """The model's rotary embedding (RoPE or YaRN), its positions starting at the cache's offset:
    megatron asks for a table as long as the tokens it is given, from position 0. With
    `rotate_here` the table becomes the cache's `Rope` and megatron gets none (it then rotates
    nothing; `CachedAttention` does)."""

    def __init__(self, rotary: torch.nn.Module, cache: KVCache, rotate_here: bool) -> None:
        super().__init__()
        self.rotary, self.cache, self.rotate_here = rotary, cache, rotate_here

    def forward(self, max_seq_len: int, offset: int = 0, **kwargs):
        table = self.rotary(max_seq_len, offset=self.cache.offset + offset, **kwargs)
        if not self.rotate_here:
            return table
        self.cache.rope = Rope(table)
        return None

    def __getattr__(self, name: str):
        """megatron also calls the embedding's helpers (`get_rotary_seq_len`): the wrapped one's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.rotary, name)


class Rope:
    """Plain RoPE over one forward's positions: megatron's unfused rotation (rope_utils.py
    `_apply_rotary_pos_emb_bshd` and `_rotate_half`, not interleaved, mscale 1; core_v0.16.1 and
    core_v0.19.0), its cos and sin computed once. `freqs` [tokens, 1, 1, rotary dim]; a head dim
    beyond the rotary dim (`rotary_percent` < 1) passes through."""

    def __init__(self, freqs: torch.Tensor) -> None:
        self.cos, self.sin = torch.cos(freqs), torch.sin(freqs)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """`t` [tokens, rows, heads, head dim] rotated."""
        dim = self.cos.shape[-1]
        rotary, passed = t[..., :dim], t[..., dim:]
        first, second = torch.chunk(rotary, 2, dim=-1)
        rotated = rotary * self.cos.to(t.dtype) + torch.cat((-second, first), dim=-1) * self.sin.to(t.dtype)
        return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated
