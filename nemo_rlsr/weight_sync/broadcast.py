"""Refit over a collective: trainer rank 0 broadcasts the HF-named stream to rollout workers that run
in other processes, on other devices or other nodes (rollout.placement=separate).

Why not CUDA IPC (shard_refit.py): a worker on another GPU or node cannot open the trainer's memory.
Why not Ray's object store: a refit would copy the whole model into shared memory (and across nodes,
through the object manager), once per worker. Here the bytes travel once per refit over a process
group of its own: the trainer's rank 0 (group rank 0) and every worker process (ranks 1..), built
from a TCPStore, not `torch.distributed.init_process_group`, because each side already owns a
default group (the trainer's megatron groups; TensorRT-LLM's Ray workers call init_process_group
themselves). Such a group is used through its own methods: `torch.distributed.broadcast(group=pg)`
accepts only groups made by `new_group` (it raises "not part of the world group").

The protocol (both sides hold the same `Manifest` and the same plan, so no size travels per refit):
* The manifest is the stream's (HF name, shape, dtype) in stream order, fixed at setup: the first
  refit's stream defines it, every later refit must match it entry by entry (a mismatch raises).
* `bucket_plan` cuts it into buckets of at most `rollout.refit_bucket_mb` (one shared constant:
  NeMo-RL's packed broadcast cuts by each side's free GPU memory, which differs when the trainer's and
  the engine's GPUs differ). A fused group (q/k/v, gate/up of one layer or expert) never straddles
  two buckets, so a loader that fuses what it receives gets all of a fused weight in one call.
* Each bucket travels as one uint8 buffer (`pack`), received into a buffer of the planned size and
  viewed back as tensors (`unpack`) that the receiver's `load` consumes before the next bucket.
"""

from __future__ import annotations

import datetime
import math
import pickle
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

Entry = tuple[str, tuple[int, ...], torch.dtype]  # (HF name, shape, dtype as sent)
Manifest = list[Entry]
Load = Callable[[list[tuple[str, torch.Tensor]]], None]
LAYOUT = "layout"  # the store key of (manifest, plan), published by the sender at setup

# q/k/v and gate/up are one tensor in megatron and in TensorRT-LLM's modules: one fused group.
_FUSED = re.compile(r"^(.*\.)(?:q_proj|k_proj|v_proj)(\.(?:weight|bias))$|^(.*\.)(?:gate_proj|up_proj)(\.weight)$")


def fused_group(name: str) -> str:
    """The name of the fused weight that `name` is part of (the name itself if it is none)."""
    match = _FUSED.match(name)
    if match is None:
        return name
    return f"{match[1]}qkv{match[2]}" if match[1] is not None else f"{match[3]}gate_up{match[4]}"


def entry_bytes(entry: Entry) -> int:
    _, shape, dtype = entry
    return math.prod(shape) * dtype.itemsize


def bucket_plan(manifest: Manifest, bucket_bytes: int) -> list[list[int]]:
    """Manifest indices per bucket, in stream order: at most `bucket_bytes` per bucket, except a fused
    group larger than that, which goes alone; a fused group's members are adjacent in the stream
    (the HF adapters emit them so) and are never split."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    groups: list[list[int]] = []
    for index, (name, _, _) in enumerate(manifest):
        if groups and fused_group(manifest[groups[-1][-1]][0]) == fused_group(name):
            groups[-1].append(index)
        else:
            groups.append([index])
    plan: list[list[int]] = []
    size = 0
    for group in groups:
        nbytes = bucket_bytes_of([manifest[i] for i in group])
        if plan and size + nbytes <= bucket_bytes:
            plan[-1].extend(group)
            size += nbytes
        else:
            plan.append(list(group))
            size = nbytes
    return plan


ALIGN = 16  # bytes: every tensor starts at a multiple, so a view of any dtype is aligned


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def bucket_bytes_of(entries: list[Entry]) -> int:
    """The size of the buffer that carries `entries`."""
    return sum(_aligned(entry_bytes(e)) for e in entries)


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes, each at an ALIGN-byte offset, as one flat uint8 tensor (on the first
    tensor's device)."""
    parts = []
    for tensor in tensors:
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        if _aligned(raw.numel()) != raw.numel():
            parts.append(raw.new_zeros(_aligned(raw.numel()) - raw.numel()))
    return torch.cat(parts)


def unpack(buffer: torch.Tensor, entries: list[Entry]) -> list[tuple[str, torch.Tensor]]:
    """(name, view of `buffer`) per entry: the inverse of `pack` (no copy)."""
    total = bucket_bytes_of(entries)
    if buffer.numel() != total:
        raise ValueError(f"a refit bucket of {buffer.numel()} bytes for entries of {total} bytes")
    out, offset = [], 0
    for name, shape, dtype in entries:
        nbytes = entry_bytes((name, shape, dtype))
        out.append((name, buffer[offset:offset + nbytes].view(dtype).view(shape)))
        offset += _aligned(nbytes)
    return out


@dataclass
class RefitGroup:
    """A process group of the trainer's rank 0 (rank 0, which hosts the TCPStore) and the rollout
    workers' processes, beside whatever default group each process has."""

    store: object
    pg: object
    rank: int
    world: int
    backend: str

    @classmethod
    def create(cls, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float) -> "RefitGroup":
        """Join the group (every member calls this; it returns once all `world` have).
        `backend`: "nccl" (CUDA tensors) or "gloo" (CPU tensors)."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout)
        prefixed = dist.PrefixStore("nemo_rlsr_refit", store)
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(prefixed, rank, world, timeout)
        elif backend == "nccl":
            # torch's ProcessGroupNCCL(store, rank, size, options); the device comes from each tensor
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, world, options)
        else:
            raise ValueError(f"refit group backend {backend!r}: choose nccl or gloo")
        group = cls(store, pg, rank, world, backend)
        device = "cuda" if backend == "nccl" else "cpu"
        group.broadcast(torch.zeros(1, device=device))  # the connection is made here, not mid-refit
        return group

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = src, 0
        self.pg.broadcast([tensor], options).wait()

    def signal_ready(self, version: int) -> None:
        """A receiver says it is inside the receive of refit `version` (the sender waits for all)."""
        self.store.set(f"ready/{version}/{self.rank}", b"1")

    def all_ready(self, version: int) -> bool:
        """Whether every receiver (ranks 1..world-1) has signalled for refit `version`."""
        return self.store.check([f"ready/{version}/{rank}" for rank in range(1, self.world)])

    def publish(self, key: str, value) -> None:
        """Put a small picklable value (the manifest and plan) where every member can `fetch` it: how
        a receiver that no Ray call reaches (a TensorRT-LLM worker) learns the layout of a refit."""
        self.store.set(key, pickle.dumps(value))

    def fetch(self, key: str):
        """The value published under `key` (waits for it up to the group's timeout)."""
        return pickle.loads(self.store.get(key))

    def close(self) -> None:
        """Release the group; an NCCL group is shut down first (its communicators are not freed by
        dropping the object)."""
        if self.pg is not None and self.backend == "nccl":
            self.pg.shutdown()
        self.pg = self.store = None


def manifest_of(named: Iterable[tuple[str, torch.Tensor]]) -> Manifest:
    """The manifest of a stream (consumes it)."""
    return [(name, tuple(t.shape), t.dtype) for name, t in named]


def _checked(named: Iterable[tuple[str, torch.Tensor]], manifest: Manifest) -> Iterator[torch.Tensor]:
    """The stream's tensors, checked against the manifest entry by entry."""
    count = 0
    for name, tensor in named:
        entry = (name, tuple(tensor.shape), tensor.dtype)
        if count >= len(manifest) or manifest[count] != entry:
            expected = manifest[count] if count < len(manifest) else "the end of the stream"
            raise RuntimeError(f"refit stream entry {count} is {entry}, the manifest has {expected} (the model "
                               f"changed shape after the refit group was set up)")
        count += 1
        yield tensor
    if count != len(manifest):
        raise RuntimeError(f"refit stream ended after {count} tensors, the manifest has {len(manifest)}")


def send_refit(group: RefitGroup, named: Iterable[tuple[str, torch.Tensor]], manifest: Manifest,
               plan: list[list[int]]) -> dict[str, float]:
    """Broadcast the stream bucket by bucket from group rank 0; returns refit/seconds, refit/gib,
    refit/buckets. Holds one bucket of gathered tensors at a time."""
    start, total, buffer = time.perf_counter(), 0, None
    tensors = _checked(named, manifest)
    for bucket in plan:
        buffer = pack([next(tensors) for _ in bucket])
        group.broadcast(buffer)
        total += buffer.numel()
    for _ in tensors:  # the check that the stream has no entry past the manifest
        pass
    _settle(None if buffer is None else buffer.device)
    return {"refit/seconds": time.perf_counter() - start, "refit/gib": total / 2**30, "refit/buckets": float(len(plan))}


def _settle(device: torch.device | str | None) -> None:
    """Wait for the device: an NCCL broadcast's wait() only orders the CUDA stream, so without this the
    seconds reported would be the time to queue the work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def receive_refit(group: RefitGroup, manifest: Manifest, plan: list[list[int]], load: Load,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Receive a refit sent by `send_refit`, passing each bucket's (name, tensor) to `load` before
    the next bucket arrives (views of the bucket's buffer: `load` copies what it keeps)."""
    start, total = time.perf_counter(), 0
    for bucket in plan:
        entries = [manifest[i] for i in bucket]
        buffer = torch.empty(bucket_bytes_of(entries), dtype=torch.uint8, device=device)
        group.broadcast(buffer)
        load(unpack(buffer, entries))
        total += buffer.numel()
    _settle(device)
    return {"refit/seconds": time.perf_counter() - start, "refit/gib": total / 2**30, "refit/buckets": float(len(plan))}
