"""Editing megatron ModuleSpec trees: the local spec gets our norm and core-attention classes."""

from __future__ import annotations

import dataclasses


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
