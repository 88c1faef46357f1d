"""The step loop both trainers run (RLSR and SFT): the reliability hooks around each step.

One sequence, so that `nemo-rlsr train` and `nemo-rlsr sft` cannot drift apart in what a
preemption signal, a run of non-finite updates or a hung step does: the step runs under the
watchdog (watchdog.py) and ends with the collective preemption check (preemption.py); then its
metrics are logged, the non-finite guard (guards.py) may stop the run, a checkpoint is saved on
schedule, at the last step or on preemption, and a preempted run raises `Preempted` after saving.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from nemo_rlsr.config import TrainerConfig
from nemo_rlsr.distributed.parallel import ParallelContext
from nemo_rlsr.trainer.guards import NonFiniteGuard
from nemo_rlsr.trainer.preemption import MARKER, Preempted, PreemptionHandler
from nemo_rlsr.trainer.watchdog import StepWatchdog


def debug_stall(cfg: TrainerConfig, next_step: int, ctx: ParallelContext) -> None:
    """`trainer.debug_stall_*`: the last rank sleeps at the start of step `debug_stall_step`,
    a deliberately slow rank for testing the watchdog, collective timeouts and mid-step preemption."""
    if cfg.debug_stall_step == next_step and ctx.rank == ctx.world_size - 1:
        time.sleep(cfg.debug_stall_s)


def guard_metrics(guard: NonFiniteGuard, step: int, updates: list[dict[str, float]]) -> dict[str, float]:
    """Feed a step's updates (from `train_step(skip_nonfinite=True)`) to the guard; the metrics
    that log how many of them were skipped."""
    skipped = sum(guard.observe(step, u) for u in updates)
    return {"guard/skipped_updates": float(skipped), "guard/skipped_updates_total": float(guard.total)}


def run_steps(cfg: TrainerConfig, ctx: ParallelContext, run_dir: Path, total_steps: int,
              preemption: PreemptionHandler, guard: NonFiniteGuard, current_step: Callable[[], int],
              train_step: Callable[[], dict], log: Callable[[dict], None], save: Callable[[], Path]) -> None:
    """Run `train_step` (which advances `current_step()` by one) until `total_steps`.

    Raises `NonFiniteError` (guard) or, after saving, `Preempted`; uninstalls the preemption
    handler on the way out. `log(metrics)` runs before the guard check, so a stopping run has
    logged the step that stopped it.
    """
    if ctx.is_logging_rank:
        (run_dir / MARKER).unlink(missing_ok=True)
    watchdog = StepWatchdog(cfg.watchdog_step_s, run_dir / "stacks", ctx.rank).start()
    try:
        while current_step() < total_steps:
            with watchdog.watch(f"step {current_step() + 1}"):
                metrics = train_step()
                stop = preemption.should_stop(ctx.device)
            step = current_step()
            log(metrics)
            guard.check()
            every = cfg.checkpoint_every
            if (every and step % every == 0) or step == total_steps or stop:
                with watchdog.watch(f"checkpoint save after step {step}"):
                    path = save()
            if stop:
                if ctx.is_logging_rank:
                    preemption.write_marker(run_dir, step, path)
                raise Preempted(step, path, preemption.received)
    finally:
        watchdog.close()
        preemption.uninstall()
