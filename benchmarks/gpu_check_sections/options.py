"""What every section is told about the run (benchmarks/gpu_check.py's command line)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    smoke: bool  # tiny shapes (CI on a CPU) instead of the GPU sizes
    hidden: tuple[str, ...] = ()  # packages made to look absent (hidden.py), also in the CLI runs
