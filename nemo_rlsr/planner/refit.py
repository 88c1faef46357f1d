"""The bytes a shard-only refit (weight_sync/shard_refit.py) moves to each GPU, from the layout alone.

Each GPU's engine worker needs its engine shard (memory.engine_weight_bytes): about 1/E of every
split tensor. What its trainer rank already holds is copied, not received: the worker's stage's
layers (1/PP of them), where the worker's engine block [r/E, (r+1)/E) of a tensor overlaps the
rank's megatron TP block [t/T, (t+1)/T). An engine's workers are its trainer ranks in ascending
order (engine_slices.engine_groups), and megatron numbers ranks TP fastest, then data parallel,
then pipeline stage, so the j-th rank of an engine's model-parallel group(s) is TP rank j % T and
engine rank j % E.

The model assumes evenly split stages and tensors (the vocabulary rows, replicated norms and the
stage imbalance of the embedding / output layer are what it leaves out); tests/test_shard_refit.py
checks it against the bytes the code counts on 4 gloo ranks.
"""

from __future__ import annotations


def local_fraction(position: int, tp: int, pp: int, engine_tp: int) -> float:
    """Share of its engine shard that the worker at `position` (in ascending rank order over its
    engine's model-parallel group(s)) finds in its own trainer shard."""
    t, r = position % tp, position % engine_tp
    lo, hi = max(r / engine_tp, t / tp), min((r + 1) / engine_tp, (t + 1) / tp)
    return max(hi - lo, 0.0) * engine_tp / pp


def received_fractions(tp: int, pp: int, engine_tp: int) -> list[float]:
    """Per trainer rank of one engine's model-parallel group(s), ascending: bytes received / engine
    shard bytes (the pattern repeats over the other groups)."""
    return [1.0 - local_fraction(j, tp, pp, engine_tp) for j in range(max(tp * pp, engine_tp))]


def refit_received_bytes(engine_shard_bytes: float, tp: int, pp: int, engine_tp: int) -> float:
    """Bytes the busiest GPU receives per refit (the refit waits for it)."""
    return engine_shard_bytes * max(received_fractions(tp, pp, engine_tp))
