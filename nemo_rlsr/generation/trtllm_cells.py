"""Which engine generates which prompts when the engine layout is not the trainer's.

The ranks of one model-parallel group (TP x PP) hold the same prompts (one data-parallel rank's);
an engine spans `rollout.tensor_parallel` = E trainer GPUs (weight_sync/engine_slices.engine_groups).
A *cell* is the smallest set of ranks that is both whole engines and whole model-parallel groups:
one group holding TP x PP / E engines (E divides TP x PP), or one engine spanning E / (TP x PP)
groups (E a multiple). Inside a cell the groups' prompts are laid end to end and cut into one
contiguous share per engine, whole prompts with their own seeds; each engine's leader generates its
share, and every rank takes its own group's completions back in prompt order.

Pure: `cells`, `shares` and `own_completions` are plain data; generation/trtllm.py runs them with
all_gather_object over the cell.
"""

from __future__ import annotations


def cells(model_parallel_groups: list[list[int]], engines: list[list[int]]) -> list[list[int]]:
    """The cells (sorted ranks), from the model-parallel groups and the engine groups."""
    groups = sorted({tuple(sorted(g)) for g in model_parallel_groups})
    if len(engines[0]) <= len(groups[0]):
        return [list(g) for g in groups]
    return [sorted(e) for e in engines]


def shares(prompt_counts: list[int], engines: int) -> list[list[tuple[int, int]]]:
    """Per engine of a cell, its (group index, prompt index) pairs: the cell's prompts (group by group,
    in order) cut into `engines` contiguous shares as even as whole prompts allow."""
    flat = [(group, prompt) for group, count in enumerate(prompt_counts) for prompt in range(count)]
    base, extra = divmod(len(flat), engines)
    out, start = [], 0
    for engine in range(engines):
        stop = start + base + (engine < extra)
        out.append(flat[start:stop])
        start = stop
    return out


def own_completions(work: list[list[tuple[int, int]]], results: list[list], group: int, count: int) -> list:
    """Group `group`'s completions in prompt order, from every engine's share (`work`) and its
    results (`results[e][i]`: the completions of `work[e][i]`)."""
    mine = [None] * count
    for share, result in zip(work, results, strict=True):
        for (g, prompt), completion in zip(share, result, strict=True):
            if g == group:
                mine[prompt] = completion
    if any(c is None for c in mine):
        raise RuntimeError(f"group {group}: prompts {[i for i, c in enumerate(mine) if c is None]} got no completion")
    return mine
