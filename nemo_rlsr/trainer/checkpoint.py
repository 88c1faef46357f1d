"""Checkpoints in megatron's `dist_checkpointing` format: resumable, and reshardable on load.

Every rank writes its own shards into `root/step_XXXXXXX.tmp`; only when all ranks are done does
rank 0 rename it to `root/step_XXXXXXX` and point `root/latest` at it, so a job killed mid-save
(preemption) leaves at worst a `.tmp` directory that `latest_checkpoint` ignores. Before the rename
the ranks write a manifest (manifest.py: sizes and sha256 of every file), which
`find_resumable_checkpoint` checks, so a checkpoint truncated or garbled after the fact is skipped
for the previous one. Old checkpoints are renamed aside before they are deleted, so a kill during
`keep_last` never leaves a half-deleted `step_*` directory. Model tensors are stored by global
shape, so a checkpoint saved at one TP/PP layout loads at another.

Besides model and optimizer, a checkpoint holds the caller's `extra` dict (step counters,
sampler state, tokenizer, config: saved once, by rank 0, so it must be the same on every rank)
and each rank's RNG states, so that a resumed run draws the same random numbers it would have.

Entry points that save must guard their code with `if __name__ == "__main__":` megatron's
checkpoint writer starts a multiprocessing Manager in a `spawn` context, which re-imports the
main module.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nemo_rlsr.models.policy import MegatronPolicy
from nemo_rlsr.trainer.manifest import verify_checkpoint, write_manifest

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{7})$")
LATEST_FILE = "latest"
_DELETING = ".deleting"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_states() -> dict[str, Any]:
    """This rank's RNG states. Under the CPU compatibility layer the "CUDA" states are CPU ones."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if torch.cuda.is_available() and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
    torch.set_rng_state(states["torch"])


def _rng_sharded_object(states: dict[str, Any] | None):
    """One object per rank (global shape = world size), so every rank gets its own states back."""
    from megatron.core.dist_checkpointing import ShardedObject

    return ShardedObject("rng_state", states, (_world_size(),), (_rank(),), replica_id=0)


def _optimizer_has_state(policy: MegatronPolicy) -> bool:
    """Adam allocates its state at the first step. Before it there is nothing to save, and
    megatron cannot load a checkpoint that lacks the optimizer tensors it asks for."""
    return policy.optimizer is not None and len(policy.optimizer.state) > 0


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def _remove(path: Path) -> None:
    """Rename out of the `step_*` namespace first: a kill mid-delete leaves only ignored debris."""
    aside = path.with_name(path.name + _DELETING)
    os.replace(path, aside)
    shutil.rmtree(aside)


def _step_directories(root: Path) -> list[Path]:
    """`step_*` directories (never `.tmp` ones: their save finished its rename), oldest first. Not
    verified: a file may have been truncated or garbled since (`find_resumable_checkpoint` checks)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(
    root: str | Path,
    step: int,
    policy: MegatronPolicy,
    extra: dict[str, Any],
    keep_last: int | None = None,
    checksums: bool = True,
) -> Path:
    """Collectively save model, optimizer, `extra` and RNG states to `root/step_{step:07d}`.

    Must be called on every rank. `keep_last` deletes all but the newest `keep_last` `step_*`
    checkpoints of steps up to `step` after the new one is in place (newer ones, left by a run
    resumed from an older checkpoint, are not counted). `checksums=False` records only file
    sizes in the manifest. Returns the final checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f"{final.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save of the same step
        for debris in root.glob(f"*{_DELETING}") if root.is_dir() else []:
            shutil.rmtree(debris, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    with_optimizer = _optimizer_has_state(policy)
    state = policy.state_dict_for_checkpoint(include_optimizer=with_optimizer)
    state["optimizer_saved"] = with_optimizer
    state["extra"] = extra
    state["world_size"] = _world_size()
    state["rng_state"] = _rng_sharded_object(_rng_states())
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    write_manifest(tmp, checksums)
    _barrier()

    if _rank() == 0:
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        if keep_last is not None:
            older = [p for p in _step_directories(root) if _step_of(p) <= step]
            for old in older[:-keep_last]:
                _remove(old)
    _barrier()
    return final


def load_checkpoint(path: str | Path, policy: MegatronPolicy, load_optimizer: bool = True) -> dict[str, Any]:
    """Collectively load a checkpoint into `policy` (any TP/PP layout); return its `extra` dict.

    RNG states are restored only when the checkpoint was saved with the same world size: with a
    different one there is no meaningful rank-to-state mapping, so they are left as seeded.
    `load_optimizer=False` loads weights only (e.g. a base model for a new run, or another layout
    than the DistributedOptimizer's `dp_reshardable` optimizer state supports). A checkpoint saved
    before the first optimizer step has no optimizer state: the optimizer is then left as it is.
    """
    from megatron.core import dist_checkpointing

    from nemo_rlsr.compat.megatron import allocate_optimizer_state, unshare_adam_steps

    path = Path(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_world = common.get("world_size") == _world_size()
    if not same_world and _rank() == 0:
        logger.warning(
            "checkpoint %s was saved by %s ranks, this run has %d: RNG states not restored",
            path, common.get("world_size"), _world_size(),
        )

    with_optimizer = load_optimizer and policy.optimizer is not None and common.get("optimizer_saved", False)
    if with_optimizer and not _optimizer_has_state(policy):
        allocate_optimizer_state(policy.optimizer)  # megatron asserts on an empty state (compat/megatron.py)
    state = policy.state_dict_for_checkpoint(is_loading=True, include_optimizer=with_optimizer)
    if same_world:
        state["rng_state"] = _rng_sharded_object(None)
    loaded = dist_checkpointing.load(state, str(path))

    # no_grad: with fp32 params the DistributedOptimizer's main params are views of the model's
    # leaf params, and its dp_reshardable loader copy_()s into them without a no_grad of its own.
    with torch.no_grad():
        policy.load_model_state(loaded)
        if with_optimizer:
            policy.optimizer.load_state_dict(loaded["optimizer"])
            unshare_adam_steps(policy.optimizer)  # megatron loads one Adam step for all (compat/megatron.py)
        elif policy.optimizer is not None:
            # Mixed-precision optimizers keep fp32 main copies of the weights: refresh them.
            policy.optimizer.reload_model_params()
    if same_world:
        _set_rng_states(loaded["rng_state"])
    return loaded["extra"]


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def find_resumable_checkpoint(root: str | Path, checksums: bool = True) -> Path | None:
    """Collectively pick the checkpoint to resume from: the one `root/latest` names, else the
    newest by step, that passes `verify_checkpoint`; each one that fails is skipped with a
    warning naming its problems. None when no checkpoint under `root` is complete."""
    root = Path(root)
    candidates = _step_directories(root)[::-1]
    pointed = latest_checkpoint(root)
    if pointed in candidates:
        candidates.remove(pointed)
        candidates.insert(0, pointed)
    for candidate in candidates:
        problems = verify_checkpoint(candidate, checksums)
        if not problems:
            return candidate
        if _rank() == 0:
            shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
            logger.warning("skipping incomplete or corrupt checkpoint %s: %s", candidate, shown)
    return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `root/latest` names, else the newest `step_*` directory, else None. Unverified
    (cheap: whether a run directory holds checkpoints at all); resume from `find_resumable_checkpoint`."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _STEP_DIR.match(candidate.name) and candidate.is_dir():
            return candidate
    saved = _step_directories(root)
    return saved[-1] if saved else None
