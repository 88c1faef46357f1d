"""Run megatron-core's real code path on a machine without CUDA.

megatron-core assumes a GPU in a few dozen places: `torch.cuda.current_device()` passed as a
`device=` argument, the CUDA RNG state kept by its tensor-parallel RNG tracker, CUDA streams and
events in the pipeline and DDP code, `torch.cuda.synchronize()`, and `.cuda()` calls. None of that
is essential to the math. `enable()` points each of those at the CPU so that GPTModel, parallel
state, DDP, the optimizers and dist checkpointing run unchanged over gloo. It is a no-op when CUDA
is available, so the same entry points run the normal path on GPU machines.

The "CUDA" RNG becomes the CPU default generator: megatron's tracker always saves and restores the
state around `fork()` and `add()`, so model-parallel dropout streams stay separate and seeded.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "_CudaDeviceToCpu | None" = None  # the global function mode `enable` entered


def cpu_mode() -> bool:
    """True when megatron should run on the CPU (no usable CUDA device)."""
    return not torch.cuda.is_available()


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event or _NullEvent()


class _NullEvent:
    """Stands in for torch.cuda.Event; timing is not measured through it on CPU."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"` arguments (megatron has such literals) to the CPU, and drops
    `pin_memory=True` (no pinned allocator without an accelerator; e.g. megatron's RoPE CP slicing)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if args and any(_is_cuda(a) for a in args[1:]):
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    """`Tensor.type()` with no argument reports CPU tensors as CUDA ones: megatron asserts e.g.
    `grad.type() == 'torch.cuda.FloatTensor'`. Conversions (`type(dtype)`) are untouched."""
    if dtype is None and not kwargs:
        name = _ORIGINAL_TENSOR_TYPE(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def enable() -> bool:
    """Patch torch.cuda / megatron for CPU execution. Returns True if patches are active."""
    global _ENABLED
    if _ENABLED:
        return True
    if not cpu_mode():
        return False

    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.device_count = lambda: 0
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = _get_rng_state
    cuda.set_rng_state = _set_rng_state
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = _get_rng_state
    cuda.random.set_rng_state = _set_rng_state
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _tensor_type

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _get_rng_state
    mcore_random._set_cuda_rng_state = _set_rng_state
    # A global mode: entered once, never exited, for the life of the process.
    global _MODE
    _MODE = _CudaDeviceToCpu()
    _MODE.__enter__()
    _ENABLED = True
    return True


@contextlib.contextmanager
def device_rewrite_suspended():
    """Run the block without the `device="cuda"` rewriting mode, for hot loops whose ops are known
    not to need it (the torch sampler's decode: tests/test_torch_sampler.py runs it with the mode
    raising on any "cuda" argument). The mode is a Python `__torch_function__` that every torch
    call goes through, a per-op cost paid thousands of times per decoded token. Nothing happens
    when the mode is not active or another function mode sits above it (that one stays in charge)."""
    if _MODE is None or torch.overrides._get_current_function_mode() is not _MODE:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield
