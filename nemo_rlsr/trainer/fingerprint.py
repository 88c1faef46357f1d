"""One sha256 over the model weights of every rank: "are these two runs bit-identical?".

A resumed run should end with exactly the weights of an uninterrupted one. Comparing metrics
catches most divergence, but only the weights say it all; the digest goes into summary.json.
Each rank hashes its own shard (names, dtypes, shapes, bytes, in name order); rank digests are
gathered and hashed in rank order, so the result covers the full model under any TP/PP/DP layout
(equal only between runs of the same layout).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def module_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parameters_sha256(module: torch.nn.Module) -> str:
    """Collective: the same digest on every rank."""
    mine = module_sha256(module)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        parts = [mine]
    else:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    return hashlib.sha256("".join(parts).encode()).hexdigest()
