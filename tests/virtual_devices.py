"""Virtual devices on a CPU-only machine: each tensor carries the device it would be on (e.g.
`cuda:0`), computes for real on the CPU, and an op that mixes devices raises as CUDA would.

`FakeTensorMode` alone fakes CUDA tensors but keeps no values, so nnsight traces that return
numbers (every verb) cannot run under it. Here the values are real; a TorchFunctionMode keeps a
virtual device per tensor, answers `tensor.device` with it, turns `.to(device)`, `.cuda()`,
`.cpu()` and `device=` arguments into a change of label, and when an op's tensors carry more
than one device it asks FakeTensorMode whether CUDA would accept that mix (a CPU scalar, a CPU
index into a CUDA tensor) or raise "Expected all tensors to be on the same device".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

CPU = torch.device("cpu")
# errors of the FakeTensor oracle that mean "CUDA would refuse this mix of devices"
_MIXED = ("Expected all tensors to be on the same device", "must be on the same device",
          "should be on the same device", "Expected tensor for argument", "device of")  # fmt: skip


class MixedDevices(RuntimeError):
    """An op met tensors on devices CUDA would not mix."""


def _device(value: Any) -> torch.device | None:
    if value is None:
        return None
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


class VirtualDevices(TorchFunctionMode):
    """Use as a context manager; `place(module_or_tensor, "cuda:0")` labels weights."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.mixes = 0  # ops whose mixed devices the oracle accepted (CPU scalars, indices)

    def device(self, t: torch.Tensor) -> torch.device:
        return self.devices.get(t, t.device)

    def place(self, obj: Any, device: str | torch.device) -> Any:
        """Label a tensor, or every parameter and buffer of a module, as living on `device`."""
        device = torch.device(device)
        tensors = (
            list(obj.parameters()) + list(obj.buffers())
            if isinstance(obj, torch.nn.Module)
            else [obj]
        )
        for t in tensors:
            self.devices[t] = device
        return obj

    def _tag(self, out: Any, device: torch.device) -> Any:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.devices[t] = device
        return out

    def _moved(self, t: torch.Tensor, result: torch.Tensor, target: torch.device) -> torch.Tensor:
        """`result` of moving t to `target`: a new tensor when the device changes, as on CUDA."""
        if target != self.device(t) and result is t:
            result = t.clone()
        self.devices[result] = target
        return result

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:  # a new method-wrapper each time: ==
            return self.device(args[0])
        if func == torch.Tensor.is_cuda.__get__:
            return self.device(args[0]).type == "cuda"
        if func is torch.Tensor.get_device:
            d = self.device(args[0])
            return -1 if d.type == "cpu" else (d.index or 0)
        if func is torch.Tensor.to:
            t, rest = args[0], args[1:]
            if rest and isinstance(rest[0], torch.Tensor):
                target, dtype = self.device(rest[0]), rest[0].dtype
                return self._moved(t, t.to(dtype), target)
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
            real = {"dtype": dtype} if dtype is not None else {}
            if "copy" in kwargs:
                real["copy"] = kwargs["copy"]
            if "memory_format" in kwargs:
                real["memory_format"] = kwargs["memory_format"]
            result = t.to(**real)
            if device is None:
                return self._tag(result, self.device(t)) if result is not t else result
            return self._moved(t, result, torch.device(device))
        if func is torch.Tensor.cuda:
            device = _device(args[1] if len(args) > 1 else kwargs.get("device", 0))
            return self._moved(args[0], args[0], device)
        if func is torch.Tensor.cpu:
            return self._moved(args[0], args[0], CPU)
        target = None
        if kwargs.get("device") is not None:
            target = _device(kwargs["device"])
            kwargs["device"] = CPU
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = list(dict.fromkeys(self.device(t) for t in tensors))
        if len(devices) > 1:
            self._check(func, args, kwargs, devices)
        out = func(*args, **kwargs)
        if target is None:
            if not devices:
                return out
            target = next((d for d in devices if d.type != "cpu"), devices[0])
        return self._tag(out, target)

    def _check(self, func: Any, args: tuple, kwargs: dict, devices: list) -> None:
        """Raise `MixedDevices` where CUDA would refuse the op's mix of devices."""
        fake_mode = FakeTensorMode(allow_non_fake_inputs=False)

        def fake(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=self.device(x))

        try:
            with fake_mode:
                fargs, fkwargs = tree_map(fake, (args, kwargs))
                func(*fargs, **fkwargs)
        except Exception as err:  # the oracle's other failures (data-dependent ops) say nothing
            message = str(err)
            if any(m in message for m in _MIXED):
                raise MixedDevices(
                    f"{getattr(func, '__qualname__', func)} mixes devices "
                    f"{[str(d) for d in devices]}: {message.splitlines()[0]}"
                ) from None
            return
        self.mixes += 1


@contextmanager
def virtual_devices() -> Iterator[VirtualDevices]:
    with VirtualDevices() as mode:
        yield mode
