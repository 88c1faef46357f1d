"""The engine side of a broadcast refit (generation/trtllm_refit_ext.py) against a recording engine:
TensorRT-LLM cannot run here, so `engine` stands in for a PyExecutor with the attributes that
tensorrt_llm/llmapi/rlhf_utils.py @04762f3b uses (model_engine.model, model_engine.model_loader.reload,
control_action). The sender is a real refit group member (gloo) in a thread of this process."""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from nemo_rlsr.distributed.parallel import free_port
from nemo_rlsr.generation import trtllm_refit_ext
from nemo_rlsr.generation.trtllm_refit_ext import PRE_RELOAD_LATCH, BroadcastReceiver
from nemo_rlsr.weight_sync.broadcast import LAYOUT, RefitGroup, bucket_plan, manifest_of, send_refit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refit_broadcast_worker import stream  # noqa: E402


class Layer(torch.nn.Module):
    def __init__(self, calls: list, removed: bool = False) -> None:
        super().__init__()
        self.calls, self._weights_removed = calls, removed

    def pre_reload_weights(self) -> None:
        self.calls.append(("pre_reload", self._weights_removed))


class Loader:
    def __init__(self, calls: list) -> None:
        self.calls, self.weights = calls, {}

    def reload(self, model, weights: dict, allow_partial_loading: bool = False) -> None:
        self.calls.append(("reload", list(weights), allow_partial_loading))
        self.weights.update({name: t.clone() for name, t in weights.items()})


def recording_worker(calls: list) -> BroadcastReceiver:
    model = torch.nn.Sequential(Layer(calls), Layer(calls, removed=True))
    worker = BroadcastReceiver()
    worker.engine = types.SimpleNamespace(model_engine=types.SimpleNamespace(model=model, model_loader=Loader(calls)))
    worker.device_id = 0
    return worker


def refit_twice(worker: BroadcastReceiver, plan) -> list[int]:
    """A trainer (group rank 0, a thread) sends `stream()` twice; the worker receives versions 0 and 1."""
    port = free_port()
    manifest = manifest_of(stream())
    sender_error = []

    def trainer() -> None:
        try:
            group = RefitGroup.create("127.0.0.1", port, 0, 2, "gloo", 30)
            group.publish(LAYOUT, (manifest, plan))
            for version in (0, 1):
                while not group.all_ready(version):
                    pass
                send_refit(group, stream(), manifest, plan)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            sender_error.append(exc)

    thread = threading.Thread(target=trainer)
    thread.start()
    group = RefitGroup.create("127.0.0.1", port, 1, 2, "gloo", 30)
    worker._nemo_rlsr_group, worker._nemo_rlsr_layout = group, group.fetch(LAYOUT)
    worker._nemo_rlsr_device = torch.device("cpu")
    loaded = [worker.nemo_rlsr_receive(0)]
    delattr(worker.engine.model_engine.model, PRE_RELOAD_LATCH)  # what update_weights(None) does
    loaded.append(worker.nemo_rlsr_receive(1))
    thread.join(timeout=60)
    assert not sender_error, sender_error
    return loaded


def test_each_bucket_reloads_partially_after_one_pre_reload_per_refit():
    calls: list = []
    worker = recording_worker(calls)
    plan = bucket_plan(manifest_of(stream()), 400)
    assert len(plan) > 2
    loaded = refit_twice(worker, plan)
    names = [name for name, _ in stream()]
    assert loaded == [len(names), len(names)]
    per_refit = [("pre_reload", False)] + [("reload", [names[i] for i in bucket], True) for bucket in plan]
    assert calls == per_refit + per_refit  # the layer marked _weights_removed is skipped, as rlhf_utils does
    assert getattr(worker.engine.model_engine.model, PRE_RELOAD_LATCH) is True  # left for update_weights(None)
    for name, tensor in stream():
        assert torch.equal(worker.engine.model_engine.model_loader.weights[name], tensor), name


def test_the_extension_class_needs_tensorrt_llm_and_wraps_both_methods_in_control_actions(monkeypatch):
    assert "RefitExtension" not in vars(trtllm_refit_ext)  # built on first access only
    with pytest.raises(ModuleNotFoundError, match="tensorrt_llm"):
        trtllm_refit_ext.RefitExtension  # noqa: B018
    # TensorRT-LLM's two names as 1.2 defines them (rlhf_utils.py, _ray_utils.py: bare decorator form)
    entered = []

    def control_action_decorator(fn):
        def wrapper(self, *args, **kwargs):
            with self.engine.control_action():
                return fn(self, *args, **kwargs)
        return wrapper

    class WorkerExtension:
        def update_weights(self, ipc_handles=None):
            return "stock"

    modules = {"tensorrt_llm": types.ModuleType("tensorrt_llm"),
               "tensorrt_llm._ray_utils": types.SimpleNamespace(control_action_decorator=control_action_decorator),
               "tensorrt_llm.llmapi": types.ModuleType("tensorrt_llm.llmapi"),
               "tensorrt_llm.llmapi.rlhf_utils": types.SimpleNamespace(WorkerExtension=WorkerExtension)}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    try:
        cls = trtllm_refit_ext.RefitExtension
    finally:
        vars(trtllm_refit_ext).pop("RefitExtension", None)  # not cached beyond this test: it is built on stand-ins
    assert cls.__name__ == "RefitExtension" and f"{cls.__module__}.{cls.__name__}" == trtllm_refit_ext.EXTENSION_QUALNAME
    assert issubclass(cls, WorkerExtension) and cls().update_weights() == "stock"

    calls: list = []
    worker = cls()
    worker.__dict__.update(vars(recording_worker(calls)))

    @contextlib.contextmanager
    def control_action():
        entered.append("in")
        yield
        entered.append("out")

    worker.engine.control_action = control_action
    refit_twice(worker, bucket_plan(manifest_of(stream()), 10**6))
    assert entered == ["in", "out", "in", "out"]  # each receive ran inside a control action
