"""What one section of the GPU check reports, kept on disk as it goes.

A GPU lease is one shot: a section that crashes, hangs or is killed must still leave every number
it had measured. So a `SectionRecord` rewrites its JSON file after every metric and check, and a
sub-check run through `attempt` records its own exception as a failed check while the section
goes on to the next one.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
TRACEBACK_LINES = 25


def error_summary(exc: BaseException) -> dict[str, Any]:
    """Type, message and the last lines of the traceback of `exc` (what a reader of the JSON needs to
    tell a missing package from a CUDA fault from a wrong number)."""
    lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip().splitlines()
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback_tail": lines[-TRACEBACK_LINES:]}


def jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become numbers or lists, NaN/Inf become strings
    (JSON has no NaN, and a NaN loss is exactly what a reader must see)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2))
    os.replace(tmp, path)


class SectionRecord:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics: dict[str, Any] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.status = "running"
        self.error: dict[str, Any] | None = None
        self.save()

    def metric(self, name: str, value: T) -> T:
        self.metrics[name] = jsonable(value)
        self.save()
        return value

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks[name] = {"ok": bool(ok), "detail": detail}
        self.save()
        return bool(ok)

    def attempt(self, name: str, fn: Callable[[], T]) -> T | None:
        """Run one sub-check; an exception becomes a failed check `name` (with the error) and None."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the section goes on
            error = error_summary(exc)
            self.checks[name] = {"ok": False, "detail": f"raised {error['type']}: {error['message'][:300]}",
                                 "error": error}
            self.save()
            return None

    def finish(self, error: BaseException | None = None) -> None:
        """`error`: what escaped the section. Else ok when every check passed (and there was one)."""
        if error is not None:
            self.status, self.error = "error", error_summary(error)
        elif not self.checks:
            self.status = "fail"
            self.error = {"type": "NoChecks", "message": "the section recorded no check", "traceback_tail": []}
        else:
            self.status = "ok" if all(c["ok"] for c in self.checks.values()) else "fail"
        self.save()

    def save(self) -> None:
        write_json(self.path, {"status": self.status, "metrics": self.metrics, "checks": self.checks,
                               "error": self.error})


def timed(fn: Callable[[], T], repeat: int = 1, warmup: int = 0) -> tuple[float, T]:
    """(best wall seconds of `repeat` calls after `warmup` untimed ones, the last result). CUDA work
    is synchronized before each clock read: kernels run asynchronously."""
    import torch

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    result = None
    for _ in range(warmup):
        result = fn()
    best = float("inf")
    for _ in range(max(repeat, 1)):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, result
