"""Group a stream of (hf_name, tensor) into size-bounded buckets, and time a whole refit.

Why buckets: an engine in another process receives each bucket as one batch of CUDA IPC handles
(one round trip per bucket, not per tensor), while the sender never holds more than one bucket of
gathered full tensors, so a refit of a model larger than one GPU's free memory still streams.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

import torch

Bucket = list[tuple[str, Any]]  # (HF name, tensor), or (HF name, weight_sync.shard_refit.EngineSlice)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_buckets(tensors: Iterable[tuple[str, Any]], bucket_bytes: int,
                 size_of: Callable[[Any], int] = tensor_bytes) -> Iterator[Bucket]:
    """Buckets of at most `bucket_bytes` (as `size_of` counts an item) in stream order; an item larger
    than that goes alone.

    A bucket is yielded as soon as the next tensor would overflow it, and the generator keeps no
    reference to it afterwards: the consumer decides when its memory is freed."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: Bucket = []
    size = 0
    for name, tensor in tensors:
        nbytes = size_of(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def refit(tensors: Iterable[tuple[str, Any]], bucket_bytes: int, push: Callable[[Bucket], None],
          size_of: Callable[[Any], int] = tensor_bytes, counted: Callable[[Any], int] = tensor_bytes
          ) -> dict[str, float]:
    """Stream `tensors` to `push` bucket by bucket (cut by `size_of`); the step metrics of the refit
    (`refit/gib`: the items' bytes as `counted` says).

    The time includes producing the tensors (TP gathers, name mapping) since that is part of what a
    refit costs the step; on CUDA the device is synchronised first so queued kernels are counted."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    total = count = 0
    for bucket in iter_buckets(tensors, bucket_bytes, size_of):
        push(bucket)
        total += sum(counted(t) for _, t in bucket)
        count += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"refit/seconds": time.perf_counter() - start, "refit/gib": total / 2**30,
            "refit/buckets": float(count)}
