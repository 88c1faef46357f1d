"""The run skeleton both trainers share: start-up checks, setup, resume, the step loop, summary, close.

`TrainingRun.fit()` is the whole life of `nemo-rlsr train` (trainer/rlsr.py) and `nemo-rlsr sft`
(trainer/sft.py), one sequence for both so that they cannot drift apart:

1. the start-up checks (trainer/startup.py), on the config alone, before any process group, data or
   model exists: a bad config is one ConfigError listing every problem;
2. process groups, the preemption handler (installed early: a signal during setup or base
   pre-training stops the run after its first step, saved), the data, the policy, the trainer's own
   components (`build`), the metrics sinks;
3. `--resume`: a path, or `auto` (the newest complete checkpoint under `trainer.output_dir`, skipping
   incomplete or corrupt ones; a fresh start when there is none at all, an error naming the problem
   when every one is damaged); else a fresh start (`start_fresh`), refused in a directory that
   already holds checkpoints;
4. the step loop (trainer/loop.py) until the trainer's `total_steps`, saving on schedule;
5. the summary (`summary.json`, printed by rank 0);
6. close: every component registered with `own()` (rollout engine, reward actor, metric sinks, the
   preemption handler) is closed however the run ends (done, exception, preemption, non-finite stop).

The checkpointed state is a `RunState` (trainer/state.py); subclasses supply their components and
their step. `setup()` is public for tests that drive single steps; call `close()` after them.
docs/design.md describes the run and one RLSR step as a whole.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from nemo_rlsr.config import OptimizerConfig, RLSRConfig, to_dict
from nemo_rlsr.data.dataset import TrainingData, load_training_data
from nemo_rlsr.data.sampler import PromptSampler
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.distributed.parallel import ParallelContext, init_distributed
from nemo_rlsr.models.interface import Policy
from nemo_rlsr.models.policy import MegatronPolicy
from nemo_rlsr.trainer.checkpoint import find_resumable_checkpoint, latest_checkpoint
from nemo_rlsr.trainer.fingerprint import parameters_sha256
from nemo_rlsr.trainer.guards import NonFiniteGuard
from nemo_rlsr.trainer.loop import run_steps
from nemo_rlsr.trainer.metrics import MetricsLogger, read_metrics
from nemo_rlsr.trainer.preemption import PreemptionHandler
from nemo_rlsr.trainer.startup import Machine, check_startup, launched_world_size, resolved_config
from nemo_rlsr.trainer.state import RunState, resolve_checkpoint

T = TypeVar("T")


class TrainingRun:
    """One training run; subclasses set `mode` and implement the hooks below `fit`."""

    mode = ""  # "rlsr" | "sft": which start-up rules apply; the progress bar's name
    stage: str | None = None  # written into the checkpoints (`extra["stage"]`)

    def __init__(self, cfg: RLSRConfig, resume: str | None = None) -> None:
        self.cfg, self.resume = cfg, resume
        self.run_dir = Path(cfg.trainer.output_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self._resources = ExitStack()
        self._set_up = False

    # ---- the life of a run -----------------------------------------------------------------------

    def fit(self) -> dict:
        """Set up, run to the last step, summarise; raises `Preempted` after saving when a preemption
        signal came, `NonFiniteError` after too many non-finite updates in a row."""
        with self._resources:
            self.setup()
            self.run_loop()
            return self.summarise()

    def setup(self) -> None:
        """Steps 1-3 of the module docstring: check, build, resume or start."""
        if self._set_up:
            return
        self._set_up = True
        self.cfg = cfg = resolved_config(self.cfg)
        check_startup(cfg, Machine.here(launched_world_size()), self.mode)
        self.ctx: ParallelContext = init_distributed(ParallelDims.from_config(cfg.parallel))
        # Early: a signal during setup or base pre-training stops the run after its first step, saved.
        self.preemption = PreemptionHandler(cfg.trainer.preemption_signals).install()
        self._resources.callback(self.preemption.uninstall)
        self.guard = NonFiniteGuard(cfg.trainer.max_consecutive_nonfinite)
        data = load_training_data(cfg.data, self.print)
        self.tokenizer = data.tokenizer
        self.policy: Policy = MegatronPolicy(cfg.model, self.first_optimizer(), self.tokenizer.vocab_size, self.ctx)
        self.state = RunState(self.tokenizer, self.build(data), self.guard, to_dict(cfg), stage=self.stage,
                              trackers=self.trackers())
        self.logger = self.own(MetricsLogger(self.run_dir, self.ctx.is_logging_rank, cfg.logging, to_dict(cfg)))
        if not (self.resume and self._resume()):
            if any(latest_checkpoint(root) for root in self.checkpoint_roots()):
                raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that "
                                      f"run, or choose another trainer.output_dir")
            self.logger.truncate_after(0)
            self.start_fresh()

    def run_loop(self) -> None:
        """The step loop to `total_steps`; the run's final state always ends up in `checkpoint_dir`."""
        bar = self.progress(self.total_steps, self.mode, initial=self.step)

        def log(metrics: dict) -> None:
            self.logger.log(self.step, metrics)
            bar.set_postfix(self.progress_fields(metrics))
            bar.update(1)

        try:
            run_steps(self.cfg.trainer, self.ctx, self.run_dir, self.total_steps, self.preemption, self.guard,
                      lambda: self.step, self.train_step, log, self.save)
        finally:
            bar.close()
        if latest_checkpoint(self.checkpoint_dir) is None:  # no step ran (e.g. resumed at the end elsewhere)
            self.save()

    def summarise(self) -> dict:
        """The run's summary on every rank (collective: the weights digest, `evaluate_final`); rank 0
        adds the `report` fields, writes `summary.json` and prints the closing lines."""
        summary: dict = {"steps": self.step, "checkpoint": str(latest_checkpoint(self.checkpoint_dir)),
                         "param_sha256": parameters_sha256(self.policy.weights),
                         "skipped_nonfinite_updates": self.guard.total}
        summary.update(self.evaluate_final())
        if self.ctx.is_logging_rank:
            records = read_metrics(self.logger.jsonl_path) if self.logger.jsonl_path.exists() else []
            summary.update(self.report(summary, records))
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(f"metrics: {self.logger.jsonl_path}  checkpoint: {summary['checkpoint']}")
        return summary

    def close(self) -> None:
        """Close every component `own()` registered, the last built first (`fit` does it itself)."""
        self._resources.close()

    # ---- what every trainer shares -----------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.state.step

    def own(self, component: T) -> T:
        """`component` (anything with `close()`) is closed when the run ends, however it ends."""
        self._resources.callback(component.close)
        return component

    def save(self, root: Path | None = None) -> Path:
        return self.state.save(root or self.checkpoint_dir, self.policy, self.cfg.trainer)

    def _resume(self) -> bool:
        """Load `self.resume` (a path, or "auto"). False when "auto" finds no checkpoint at all, so that
        a requeued job whose first attempt died before its first save starts afresh."""
        checksums = self.cfg.trainer.checkpoint_checksums
        if self.resume == "auto":
            path = next(filter(None, (find_resumable_checkpoint(root, checksums)
                                      for root in self.checkpoint_roots())), None)
            if path is None and any(latest_checkpoint(root) for root in self.checkpoint_roots()):
                raise FileNotFoundError(f"--resume auto: every checkpoint under {self.run_dir} is incomplete "
                                        f"or corrupt (see the warnings above)")
            if path is None:
                self.print(f"--resume auto: no checkpoint under {self.run_dir} yet; starting afresh")
                return False
        else:
            path = resolve_checkpoint(self.resume, checksums)
        self.before_resume()
        self.state.load(path, self.policy)
        self.logger.truncate_after(self.step)
        self.print(f"resumed from {path} at step {self.step}")
        return True

    def progress(self, total: int, desc: str, initial: int = 0) -> tqdm:
        # Redraw often on a terminal, rarely in a log file (CI, Slurm) where each redraw is a line.
        interactive = sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=desc, mininterval=0.2 if interactive else 15.0,
                    disable=not (self.cfg.trainer.progress_bar and self.ctx.is_logging_rank))

    def print(self, message: str) -> None:
        if self.ctx.is_logging_rank:
            tqdm.write(message)

    # ---- what each trainer supplies ----------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        raise NotImplementedError

    def first_optimizer(self) -> OptimizerConfig:
        """The optimizer the policy is built with."""
        return self.cfg.optimizer

    def build(self, data: TrainingData) -> PromptSampler:
        """The trainer's components over `data` (after the policy); returns the prompt sampler."""
        raise NotImplementedError

    def trackers(self) -> dict:
        """Stateful metric helpers (after `build`) the checkpoint saves with the run state."""
        return {}

    def checkpoint_roots(self) -> list[Path]:
        """Where this run's checkpoints live, in the order `--resume auto` searches them."""
        return [self.checkpoint_dir]

    def start_fresh(self) -> None:
        """A new run: initial weights (and whatever else step 0 needs)."""

    def before_resume(self) -> None:
        """Runs just before a checkpoint is loaded into the policy and the state."""

    def train_step(self) -> dict[str, float]:
        """One step; advances `self.state.step` by one and returns the step's metrics."""
        raise NotImplementedError

    def progress_fields(self, metrics: dict) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {}

    def evaluate_final(self) -> dict:
        """Summary fields every rank computes (collective work, e.g. a held-out evaluation)."""
        return {}

    def report(self, summary: dict, records: list[dict]) -> dict:
        """Rank 0: summary fields from the logged metrics, and the lines printed at the end."""
        return {}
