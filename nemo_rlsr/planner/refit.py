"""The bytes a shard-only refit (weight_sync/shard_refit.py) moves to each GPU, from the layout alone.

Each GPU's engine worker needs its engine shard (memory.engine_weight_bytes): about 1/E of every
split tensor. What its trainer rank already holds is copied, not received: the worker's stage's
layers (1/PP of them), where the worker's engine block [r/E, (r+1)/E) of a tensor overlaps the
rank's megatron TP block [t/T, (t+1)/T). Workers take trainer ranks in megatron's order (TP rank
fastest, then stage; whole model-parallel groups when E > TP x PP; engine_slices.engine_groups),
so rank i of a model-parallel group is TP rank i % T of stage i // T and engine rank i % E when
E divides TP x PP, engine rank k x TP x PP + i in the k-th group of an engine when E is a multiple.

The model assumes evenly split stages and tensors (the vocabulary rows, replicated norms and the
stage imbalance of the embedding / output layer are what it leaves out); tests/test_shard_refit.py
checks it against the bytes the code counts on 4 gloo ranks.
"""

from __future__ import annotations


def local_fraction(position: int, tp: int, pp: int, engine_tp: int, group_index: int = 0) -> float:
    """Share of its engine shard that the worker at `position` of its model-parallel group (TP x PP
    ranks) finds in its own trainer shard; `group_index`: which group of a larger engine it is in."""
    mp = tp * pp
    t = position % tp
    r = (position + group_index * mp) % engine_tp if engine_tp > mp else position % engine_tp
    lo, hi = max(r / engine_tp, t / tp), min((r + 1) / engine_tp, (t + 1) / tp)
    return max(hi - lo, 0.0) * engine_tp / pp


def received_fractions(tp: int, pp: int, engine_tp: int) -> list[float]:
    """Per trainer rank of one engine's model-parallel group(s), in rank order: bytes received /
    engine shard bytes (the pattern repeats over the other groups)."""
    mp = tp * pp
    return [1.0 - local_fraction(i % mp, tp, pp, engine_tp, i // mp) for i in range(max(mp, engine_tp))]


def refit_received_bytes(engine_shard_bytes: float, tp: int, pp: int, engine_tp: int) -> float:
    """Bytes the busiest GPU receives per refit (the refit waits for it)."""
    return engine_shard_bytes * max(received_fractions(tp, pp, engine_tp))
