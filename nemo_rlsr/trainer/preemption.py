"""Preemption: a signal asks the run to stop; all ranks stop after the same step, save, and exit 75.

Slurm warns a job before killing it (SIGTERM on preemption or `scancel`, then SIGKILL after
KillWait; `--signal=USR1@120` sends SIGUSR1 two minutes before the time limit). The handler only
sets a flag (a signal handler must not run collectives or I/O); at the end of each step the loop
all-reduces the flag, so a signal that reached one rank stops every rank at the same step boundary
(the current step is finished, not abandoned: its updates are already applied on every rank). The
loop then saves a checkpoint and exits with `PREEMPTED_EXIT_CODE`, which a Slurm script turns into
`scontrol requeue`; the requeued job runs with `--resume auto`. Rank 0 also writes
`output_dir/preempted.json`, for launchers that do not pass a worker's exit code on (torchrun
exits 1 when a worker exits non-zero; it also kills its workers 30 s after forwarding a signal,
and forwards SIGUSR1 only with `--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_rlsr.config.rules import signal_problems

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". Distinct from a
# crash (1), a config error (2) and a death by signal (128 + n).
PREEMPTED_EXIT_CODE = 75
MARKER = "preempted.json"


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is saved; the CLI exits 75."""

    def __init__(self, step: int, checkpoint: Path, signal_name: str) -> None:
        super().__init__(f"preempted by {signal_name} after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


def _protect_checkpoint_writer(signals: list[signal.Signals]) -> None:
    """Start megatron's checkpoint-writer helper process now, with `signals` ignored.

    megatron's async file writer keeps one `spawn`ed multiprocessing Manager for the life of the
    process (made at the first save). Slurm signals every process of a job step, so that helper
    would die of the very signal we handle and the preemption save would fail. An ignored signal
    disposition survives exec, so the helper started here ignores them. Best effort: the private
    function may move in another megatron-core version.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        start = filesystem_async._get_write_results_queue
    except (ImportError, AttributeError):
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class PreemptionHandler:
    """Installs handlers for `signal_names` (e.g. ["SIGTERM", "SIGUSR1"]); `should_stop()` agrees."""

    def __init__(self, signal_names: list[str]) -> None:
        problems = signal_problems(signal_names)
        if problems:
            raise ValueError("; ".join(problems))
        self.signals = [signal.Signals[name] for name in signal_names]
        self.received: str | None = None  # the signal's name, for messages
        self._signum = 0
        self._previous: dict[signal.Signals, object] = {}

    def install(self, protect_checkpoint_writer: bool = True) -> "PreemptionHandler":
        if protect_checkpoint_writer:
            _protect_checkpoint_writer(self.signals)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if not self._signum:
            self._signum, self.received = signum, signal.Signals(signum).name

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """Collective: True on every rank if any rank received a signal. Call once per step."""
        # The signal's number travels in the flag, so every rank can name it.
        flag = torch.tensor([float(self._signum)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self._signum:
            self._signum = int(flag.item())
            self.received = f"{signal.Signals(self._signum).name} (sent to another rank)"
        return bool(flag.item())

    def write_marker(self, run_dir: Path, step: int, checkpoint: Path) -> None:
        (run_dir / MARKER).write_text(json.dumps(
            {"step": step, "checkpoint": str(checkpoint), "signal": self.received,
             "exit_code": PREEMPTED_EXIT_CODE}) + "\n")
