"""A fake accelerator for CPU tests: code runs as on a CUDA machine, and a host tensor that meets a
device tensor raises, as CUDA would.

On a GPU machine a tensor built without a device (`torch.tensor(...)`, `torch.zeros(...)`), or moved
with `.cpu()`, lives in host memory; one built with a CUDA device, moved there with `.to` / `.cuda()`,
or computed from device tensors, lives on the GPU; an op that mixes the two (other than with a 0-dim
host scalar, or a copy between them) fails, and NCCL collectives take device tensors only. On a CPU
all of them are host tensors and such a bug stays invisible.

`fake_accelerator()` records, for every tensor made while it is active, the device it was made for
(an attribute on the tensor: "device" or "host"; tensors made before it was entered or out of its
view, e.g. by autograd's backward, carry none and are never flagged), answers `tensor.device` with `cuda:0` for device tensors, and
raises `HostTensorOnDevice` on an op or collective that would fail on a GPU. It also makes the
process look like a one-GPU machine to the code under test (`torch.cuda.is_available()`,
`current_device()`, capability 9.0, a GPU-less `torch.Generator`), so that the CUDA branches run: e.g.
megatron builds parameters and buffers with `device=torch.cuda.current_device()`. The data stays in
host memory throughout: the numbers are the CPU's.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

DEVICE = torch.device("cuda", 0)
_PLACE = "_fake_accelerator_place"  # "device" | "host"; absent: made outside the fake's view
# Calls that may take tensors of both kinds on a GPU: copies between devices, indexing with host
# indices, and nn.Module's check before it rebinds `.data` (attribute reads and writes are handled apart).
_CROSS_DEVICE = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.copy_, torch.Tensor.__getitem__,
                 torch.Tensor.__setitem__, torch._has_compatible_shallow_copy_type}
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                "reduce", "all_to_all_single", "send", "recv", "isend", "irecv")


class HostTensorOnDevice(RuntimeError):
    """A host tensor met a device tensor (or an NCCL collective): the op would fail on a GPU."""


def place(tensor: torch.Tensor) -> str | None:
    return getattr(tensor, _PLACE, None)


def _mark(tensors, where: str) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            setattr(t, _PLACE, where)


def move_to_device(module: torch.nn.Module) -> None:
    """What `module.cuda()` does on a GPU machine: every parameter and buffer is a device tensor."""
    _mark(list(module.parameters()) + list(module.buffers()), "device")


def _is_device(value) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True  # torch.cuda.current_device() returns an int
    if isinstance(value, str):
        return value.startswith("cuda")
    return isinstance(value, torch.device) and value.type == "cuda"


def _is_host_device(value) -> bool:
    return (isinstance(value, str) and value == "cpu") or (isinstance(value, torch.device) and value.type == "cpu")


def _describe(tensor: torch.Tensor) -> str:
    return f"{place(tensor) or 'unknown'} {tuple(tensor.shape)} {tensor.dtype}"


def _check_not_host(name: str, tensors) -> None:
    host = [t for t in tensors if isinstance(t, torch.Tensor) and place(t) == "host"]
    if host:
        raise HostTensorOnDevice(f"{name} on a host tensor {_describe(host[0])}: NCCL takes device tensors only")


class _Tracker(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        descriptor = getattr(func, "__self__", None)
        if descriptor is torch._C.TensorBase.device and func.__name__ == "__get__":
            return DEVICE if place(args[0]) == "device" else func(*args, **kwargs)
        if descriptor is torch._C.TensorBase.is_cuda and func.__name__ == "__get__":
            return place(args[0]) == "device"
        if descriptor is torch._C.TensorBase.data and func.__name__ == "__set__":
            func(*args, **kwargs)  # `x.data = y`: x now holds y's storage, and y's place
            if place(args[1]):
                _mark([args[0]], place(args[1]))
            return None
        if descriptor is not None:  # other attribute reads and writes (shape, grad, ...)
            return func(*args, **kwargs)

        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func not in _CROSS_DEVICE:
            self._check(func, inputs)
        target, call, args, kwargs = self._target(func, args, kwargs)
        out = call(*args, **kwargs)
        if target is None:
            kinds = {place(t) for t in inputs}
            target = "device" if "device" in kinds else "host" if ("host" in kinds or not inputs) else None
        if target is not None:
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            _mark([t for t in outputs if not any(t is i for i in inputs)], target)
        return out

    @staticmethod
    def _target(func, args, kwargs):
        """Where `func` puts its result when the call says so ("device" / "host", else None), with
        CUDA devices in the call replaced by the CPU. Moves always copy, so that the moved tensor and
        the original stay two tensors with their own places."""
        target = None
        if func is torch.Tensor.cpu:
            return "host", torch.Tensor.to, (args[0], "cpu"), {"copy": True}  # as Tensor.to below
        if func is torch.Tensor.to:
            device = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(device, torch.Tensor):  # .to(other): other's device and dtype
                target, device = place(device), None
            if device is not None and (_is_device(device) or _is_host_device(device)):
                target = "device" if _is_device(device) else "host"
                rest = [a for a in args[1:] if not (_is_device(a) or _is_host_device(a))]
                args = (args[0], "cpu", *rest)
                kwargs = {**{k: v for k, v in kwargs.items() if k != "device"}, "copy": True}
            return target, func, args, kwargs
        if "device" in kwargs and kwargs["device"] is not None:
            device = kwargs["device"]
            if _is_device(device):
                target, kwargs = "device", {**kwargs, "device": "cpu"}
            elif _is_host_device(device):
                target = "host"
        return target, func, args, kwargs

    @staticmethod
    def _check(func, inputs) -> None:
        device = [t for t in inputs if place(t) == "device"]
        host = [t for t in inputs if place(t) == "host" and t.dim() > 0]  # 0-dim host tensors are scalars to CUDA
        if device and host:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise HostTensorOnDevice(f"{name} mixes a device tensor {_describe(device[0])} with a host tensor "
                                     f"{_describe(host[0])}: this op fails on a GPU")


class _HostGenerator(torch.Generator):
    """`torch.Generator(device="cuda")` needs CUDA; the fake's generators live on the host."""

    def __new__(cls, device=None):
        return super().__new__(cls, device="cpu")

    def __init__(self, device=None):
        pass


def _parameter_new(original):
    """`nn.Parameter(data)` makes a new tensor object outside the function mode's view; it lives
    where `data` does."""

    def new(cls, data=None, requires_grad=True):
        param = original(cls, data, requires_grad)
        if data is not None and place(data):
            _mark([param], place(data))
        return param

    return new


def _checked(name: str, collective):
    def run(*args, **kwargs):
        _check_not_host(f"torch.distributed.{name}", tree_leaves((args, kwargs)))
        return collective(*args, **kwargs)

    return run


@contextlib.contextmanager
def fake_accelerator() -> Iterator[None]:
    """Run the body as on a one-GPU machine whose device tensors are checked (see the module doc)."""
    from nemo_rlsr.distributed import cpu_compat

    cpu_compat.enable()  # megatron's own CUDA calls keep going to the CPU (it decides by is_available())
    cuda = torch.cuda
    saved = {
        (cuda, "is_available"): cuda.is_available,
        (cuda, "current_device"): cuda.current_device,
        (cuda, "get_device_capability"): cuda.get_device_capability,
        (cuda, "get_device_name"): cuda.get_device_name,
        (torch.Tensor, "cuda"): torch.Tensor.cuda,
        (torch, "Generator"): torch.Generator,
        (torch.nn.Parameter, "__new__"): torch.nn.Parameter.__dict__["__new__"],
        **{(dist, name): getattr(dist, name) for name in _COLLECTIVES},
    }
    cuda.is_available = lambda: True
    cuda.current_device = lambda: 0
    cuda.get_device_capability = lambda device=None: (9, 0)
    cuda.get_device_name = lambda device=None: "fake accelerator"
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kw: self.to(DEVICE)
    torch.Generator = _HostGenerator
    torch.nn.Parameter.__new__ = _parameter_new(torch.nn.Parameter.__new__)
    for name in _COLLECTIVES:
        setattr(dist, name, _checked(name, saved[(dist, name)]))
    try:
        with _Tracker():
            yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
