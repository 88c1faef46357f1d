"""The run state a checkpoint carries besides the weights, optimizer and RNG states.

`RunState` is the `extra` dict of every checkpoint (checkpoint.py saves it once, by rank 0), built
from the components that know how to save and restore themselves (`state_dict` /
`load_state_dict`: the prompt sampler, the non-finite guard), as torchtitan's checkpoint manager
composes its Stateful components. Its keys are the checkpoint format: `step`, `sampler`,
`tokenizer` (the serialized tokenizer: a checkpoint only means something with the ids it was
trained on), `config` (the run's config as a dict: `export-hf` and `eval` rebuild the model from it),
`base_heldout` (RLSR: the base policy's held-out score, printed next to the trained one), `guard`,
`trackers` (the trainer's stateful metric windows, e.g. RLSR's entropy trend; absent when it has
none) and `stage: "sft"` in SFT checkpoints. Both trainers write the same keys, so an SFT checkpoint is
what an RLSR run's `pretrain.init_checkpoint` loads and what `export-hf` / `eval` read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_rlsr.config import ConfigError, TrainerConfig
from nemo_rlsr.data.chat import Tokenizer
from nemo_rlsr.data.sampler import PromptSampler
from nemo_rlsr.models.policy import MegatronPolicy
from nemo_rlsr.trainer.checkpoint import find_resumable_checkpoint, load_checkpoint, save_checkpoint
from nemo_rlsr.trainer.guards import NonFiniteGuard
from nemo_rlsr.trainer.manifest import verify_checkpoint


@dataclass
class RunState:
    tokenizer: Tokenizer
    sampler: PromptSampler
    guard: NonFiniteGuard
    config: dict
    step: int = 0
    base_heldout: dict | None = None
    stage: str | None = None
    trackers: dict[str, Any] = field(default_factory=dict)  # name -> object with state_dict / load_state_dict

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "tokenizer": self.tokenizer.to_json(),
                 "config": self.config, "base_heldout": self.base_heldout, "guard": self.guard.state_dict()}
        if self.trackers:
            state["trackers"] = {name: t.state_dict() for name, t in self.trackers.items()}
        return state | ({"stage": self.stage} if self.stage else {})

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        check_tokenizer(state, self.tokenizer, source)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.base_heldout = state.get("base_heldout")
        # checkpoints written before the guard existed have no count: none was skipped then
        self.guard.load_state_dict(state.get("guard", {"consecutive": 0, "total": 0}))
        saved = state.get("trackers", {})  # an SFT checkpoint (or an older one) has none: they start empty
        for name, tracker in self.trackers.items():
            if name in saved:
                tracker.load_state_dict(saved[name])

    def save(self, root: Path, policy: MegatronPolicy, cfg: TrainerConfig) -> Path:
        """Collectively save the policy and this state as `root/step_{step:07d}` (checkpoint.py)."""
        return save_checkpoint(root, self.step, policy, self.state_dict(),
                               keep_last=cfg.keep_last_checkpoints or None, checksums=cfg.checkpoint_checksums)

    def load(self, path: Path, policy: MegatronPolicy) -> None:
        """Collectively load `path` into the policy (weights and optimizer) and this state."""
        self.load_state_dict(load_checkpoint(path, policy), path)


def check_tokenizer(state: dict[str, Any], tokenizer: Tokenizer, source: Path) -> None:
    """The checkpoint's tokenizer must be this run's (same ids), else the weights would mean other words."""
    if state.get("tokenizer") != tokenizer.to_json():
        raise ConfigError(f"{source}: the checkpoint's tokenizer differs from this run's data (a checkpoint "
                         f"continues or starts a run on the same data.path and data.tokenizer_path only)")


def resolve_checkpoint(path: str | Path, checksums: bool = True) -> Path:
    """A complete checkpoint: `path` itself, or the newest complete one under the root `path`."""
    path = Path(path)
    problems = verify_checkpoint(path, checksums)
    if not problems:
        return path
    found = find_resumable_checkpoint(path, checksums)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint ({'; '.join(problems[:3])}) nor a "
                                f"directory holding one")
    return found


def load_init_checkpoint(path: str | Path, policy: MegatronPolicy, tokenizer: Tokenizer,
                         checksums: bool = True) -> Path:
    """Load the weights (not the optimizer) of `path` (`pretrain.init_checkpoint`) into `policy`;
    returns the checkpoint it resolved to."""
    resolved = resolve_checkpoint(path, checksums)
    check_tokenizer(load_checkpoint(resolved, policy, load_optimizer=False), tokenizer, resolved)
    return resolved
