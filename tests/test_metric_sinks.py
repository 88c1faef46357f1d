"""Metrics reach W&B (offline mode) and MLflow (local file store) as logged, and JSONL always."""

import json
import time

import pytest

from nemo_rlsr.config import LoggingConfig
from nemo_rlsr.trainer.metrics import MetricsLogger

STEPS = {1: {"reward/mean": 0.123457, "kl": 0.0, "sample/response": "a dog"},
         2: {"reward/mean": 0.654321, "kl": 0.25, "sample/response": "a cat"}}
CONFIG = {"grpo": {"num_generations": 8}, "optimizer": {"lr": 1e-4}}


def log_all(logger: MetricsLogger) -> None:
    for step, metrics in STEPS.items():
        logger.log(step, metrics)
    logger.close()


def test_mlflow_receives_every_scalar_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store; clusters use an http server
    uri = f"file://{tmp_path / 'mlruns'}"
    cfg = LoggingConfig(tensorboard=False, mlflow_tracking_uri=uri, mlflow_experiment="test", run_name="r1")
    log_all(MetricsLogger(tmp_path / "run", True, cfg, CONFIG))

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    history = {(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward/mean")}
    assert history == {(1, 0.123457), (2, 0.654321)}
    assert {m.step for m in client.get_metric_history(run.info.run_id, "kl")} == {1, 2}
    assert "sample/response" not in run.data.metrics  # strings stay in metrics.jsonl
    assert run.data.params["grpo.num_generations"] == "8"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["sample/response"] for line in lines] == ["a dog", "a cat"]


def test_wandb_offline_run_holds_the_logged_values(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    log_all(MetricsLogger(run_dir, True, LoggingConfig(tensorboard=False, wandb_project="nemo-rlsr-test"), CONFIG))

    (record_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # wandb's writer is a separate process; on a loaded machine it may still be flushing the
    # records when finish() returns (seen once in CI: only the file header was there yet)
    deadline = time.monotonic() + 60
    while b"0.654321" not in (data := record_file.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for needle in (b"reward/mean", b"0.123457", b"0.654321", b"num_generations"):
        assert needle in data, needle
    assert b"a dog" not in data  # only scalars are sent


def test_a_configured_but_missing_backend_is_an_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, True, LoggingConfig(tensorboard=False, wandb_project="p"))
