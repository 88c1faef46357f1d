"""Per-step metrics: JSONL always; TensorBoard, W&B and MLflow as configured; a reward-curve PNG.

Only the logging rank writes. JSONL is the record of truth (one object per step, appended and
flushed, so a preempted run keeps what it logged); plots and the other sinks are views of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from nemo_rlsr.config import LoggingConfig
from nemo_rlsr.trainer.metric_sinks import build_sinks, scalars


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, cfg: LoggingConfig | None = None,
                 config: dict | None = None) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._sinks: list = []
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._sinks = build_sinks(cfg or LoggingConfig(), run_dir, config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.jsonl_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        values = scalars(metrics)
        for sink in self._sinks:
            sink.log(step, values)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint (they will be recomputed)."""
        if not self.enabled or not self.jsonl_path.exists():
            return
        kept = [line for line in self.jsonl_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.jsonl_path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_reward(records: list[dict], png_path: Path) -> None:
    """Mean reward per step with its min-max band and a 10-step running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    mean = [r["reward/mean"] for r in records]
    window = 10
    running = [sum(mean[max(0, i - window + 1) : i + 1]) / len(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.fill_between(steps, [r["reward/min"] for r in records], [r["reward/max"] for r in records],
                    alpha=0.15, label="min-max over rollouts")
    ax.plot(steps, mean, lw=1, alpha=0.6, label="mean reward")
    ax.plot(steps, running, lw=2, label=f"{window}-step running mean")
    ax.set_xlabel("step")
    ax.set_ylabel("reward (cosine to reference)")
    ax.set_title("RLSR reward per step")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
