"""Optional destinations for the per-step scalars: TensorBoard, Weights & Biases, MLflow.

Each is imported only when configured (`logging.*`), so a run that uses none needs none of them;
a configured one that is not installed is an error naming the package, not a silent no-op.
Only finite numbers are sent (strings such as `sample/response` stay in metrics.jsonl).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from nemo_rlsr.config import LoggingConfig


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _require(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"logging is configured for {module} but it is not installed: pip install {package}") from exc


class TensorBoardSink:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per output directory: its id is derived from the directory, so a requeued
    (resumed) job appends to the same run instead of starting a new one."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict) -> None:
        wandb = _require("wandb", "wandb")
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, id=run_id, resume="allow",
                              name=cfg.run_name or run_dir.name, dir=str(run_dir), config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict) -> None:
        mlflow = _require("mlflow", "mlflow-skinny")
        mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
        mlflow.set_experiment(cfg.mlflow_experiment)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=cfg.run_name or run_dir.name)
        flat = {k: str(v)[:500] for k, v in _flatten(config).items()}  # MLflow caps param values
        for start in range(0, len(flat), 100):  # and the number of params per call
            mlflow.log_params(dict(list(flat.items())[start : start + 100]))

    def log(self, step: int, values: dict[str, float]) -> None:
        # MLflow metric names may not contain some characters; ours use letters, digits, _ / .
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_sinks(cfg: LoggingConfig, run_dir: Path, config: dict) -> list:
    sinks: list = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    if cfg.wandb_project:
        sinks.append(WandbSink(cfg, run_dir, config))
    if cfg.mlflow_tracking_uri:
        sinks.append(MlflowSink(cfg, run_dir, config))
    return sinks
