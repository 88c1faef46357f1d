"""Bad numbers: non-finite losses or gradient norms (rewards are checked by `RewardResult.check`).

A single non-finite update is usually a transient (one pathological
batch): the policy skips it (`MegatronPolicy.train_step(skip_nonfinite=True)`, nothing applied) and
the guard counts it; several in a row mean the run itself is broken, and the guard stops it with an
error naming the limit, instead of burning the allocation on skipped steps.
"""

from __future__ import annotations

import math

from nemo_rlsr.models.policy import LossFn


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with a non-finite loss or gradient norm."""


def inject_nan(loss_fn: LossFn) -> LossFn:
    """`loss_fn` with its loss multiplied by NaN: the fault that `trainer.debug_inject_nan_steps` injects."""

    def poisoned(logprobs, entropy, mb):
        loss, metrics = loss_fn(logprobs, entropy, mb)
        poisoned_metrics = {k: v * float("nan") if k == "loss" else v for k, v in metrics.items()}
        return loss * float("nan"), poisoned_metrics

    return poisoned


class NonFiniteGuard:
    """Counts skipped (non-finite) updates; `check()` raises after `max_consecutive` (>= 1, a start-up
    rule: config/rules.py) in a row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self._last: tuple[int, float, float] | None = None

    def observe(self, step: int, update: dict[str, float]) -> bool:
        """Record one update's metrics (from `train_step(skip_nonfinite=True)`); True if skipped."""
        skipped = bool(update.get("nonfinite", 0.0))
        if skipped:
            self.consecutive += 1
            self.total += 1
            self._last = (step, update.get("loss", math.nan), update.get("grad_norm", math.nan))
        else:
            self.consecutive = 0
        return skipped

    def check(self) -> None:
        if self.consecutive >= self.max_consecutive:
            step, loss, grad_norm = self._last or ("?", math.nan, math.nan)
            raise NonFiniteError(
                f"{self.consecutive} consecutive updates with a non-finite loss or gradient norm, the last at "
                f"step {step} (loss {loss}, grad_norm {grad_norm}); trainer.max_consecutive_nonfinite="
                f"{self.max_consecutive}. The weights are those of the last finite update; check the data, "
                f"the learning rate, and trainer.debug_inject_nan_steps."
            )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
