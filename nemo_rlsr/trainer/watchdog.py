"""Hang diagnosis: dump every thread's Python stack when a watched span (a step) runs too long.

A hung collective (one rank died, or took another code path) blocks the other ranks silently
until the collective timeout, and the timeout's error says where they waited, not why. When a step
overruns `limit_s`, each rank's watchdog thread writes all of its threads' stacks (faulthandler)
to `dump_dir/rank{rank:05d}.txt` and to stderr: the rank whose stack is somewhere else than a
collective is the culprit. Every rank stuck in the step dumps, since each watches its own clock.
The dump needs the GIL, which blocked torch collectives and sleeps release; it dumps once per
span and never stops the run (the collective timeout, `parallel.collective_timeout_s`, does).
"""

from __future__ import annotations

import faulthandler
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class StepWatchdog:
    def __init__(self, limit_s: float, dump_dir: Path, rank: int) -> None:
        self.limit_s = limit_s
        self.rank = rank
        self.path = Path(dump_dir) / f"rank{rank:05d}.txt"
        self.dumps = 0
        self._cond = threading.Condition()
        self._span: tuple[str, float] | None = None  # (label, start time)
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> "StepWatchdog":
        if self.limit_s > 0:
            self._thread = threading.Thread(target=self._run, name="nemo-rlsr-watchdog", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @contextmanager
    def watch(self, label: str):
        """Dump stacks if the body is still running `limit_s` seconds after it began."""
        with self._cond:
            self._span = (label, time.monotonic())
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._span = None
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._span is None:
                    self._cond.wait()
                    continue
                label, started = self._span
                remaining = started + self.limit_s - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._dump(label, time.monotonic() - started)
                while self._span is not None and self._span[1] == started and not self._closed:
                    self._cond.wait()  # once per span

    def _dump(self, label: str, elapsed: float) -> None:
        header = (f"=== nemo_rlsr watchdog: rank {self.rank} on {socket.gethostname()}: {label} running for "
                  f"{elapsed:.1f}s (trainer.watchdog_step_s={self.limit_s:g}) at {time.strftime('%H:%M:%S')}\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as sink:
            sink.write(header)
            sink.flush()
            faulthandler.dump_traceback(file=sink, all_threads=True)
        stderr = sys.__stderr__ or sys.stderr
        try:
            stderr.write(header)
            stderr.flush()
            faulthandler.dump_traceback(file=stderr, all_threads=True)
        except (AttributeError, OSError, ValueError):  # no usable stderr: the file has it
            pass
        self.dumps += 1
