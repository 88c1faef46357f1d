"""Editing megatron ModuleSpec trees (the local spec gets our norm and core-attention classes, the
TE spec its attention mask type), and switching a built model's attention mask type for a while."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator


def replace_module(spec, old: type, new: type):
    """A copy of `spec` (a ModuleSpec, a block spec, or a list of them) with `new` wherever `old`
    is a submodule class; megatron's own spec objects are left as they are."""
    if spec is old:
        return new
    if isinstance(spec, list):
        return [replace_module(item, old, new) for item in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: replace_module(getattr(spec, f.name), old, new)
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


def with_attention_mask_type(spec, mask_type):
    """A copy of `spec` whose attention modules get `attn_mask_type=mask_type`.

    Why: the policy's batches carry their own mask (left-padded prompts, packed segments). The
    local spec's attention applies a given mask whatever its mask type says; Transformer Engine's
    does not: with `causal` it ignores the mask, and its `padding*` types assume right padding. So
    the TE spec gets `arbitrary` (TE's unfused attention then applies our mask exactly)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, list):
        return [with_attention_mask_type(item, mask_type) for item in spec]
    if not dataclasses.is_dataclass(spec) or isinstance(spec, type):
        return spec
    fields = {f.name: with_attention_mask_type(getattr(spec, f.name), mask_type)
              for f in dataclasses.fields(spec) if f.init and f.name != "params"}
    if isinstance(spec, ModuleSpec) and "attn_mask_type" in spec.params:
        fields["params"] = {**spec.params, "attn_mask_type": mask_type}
    return dataclasses.replace(spec, **fields)


@contextmanager
def attention_mask_type(module, mask_type) -> Iterator[None]:
    """Every megatron attention of `module` runs `mask_type` inside the block (restored on exit, also
    on an exception). megatron's Attention reads `self.attn_mask_type` at each forward and hands it
    to its core attention (core_v0.16.1 megatron/core/transformer/attention.py), and Transformer
    Engine takes a forward-time mask type over its constructor's (TransformerEngine v2.9
    transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py, forward).
    Why: under the THD layout the TE spec is built `causal`, while the torch sampler's passes carry
    an explicit mask (left-padded prompts, a KV cache) that only `arbitrary` applies."""
    from megatron.core.transformer.attention import Attention

    layers = [m for m in module.modules() if isinstance(m, Attention)]
    saved = [(layer, layer.attn_mask_type) for layer in layers]
    for layer in layers:
        layer.attn_mask_type = mask_type
    try:
        yield
    finally:
        for layer, original in saved:
            layer.attn_mask_type = original
