"""Where the host waits for the device: the calls that synchronise a GPU with Python.

Reading a tensor's value into Python (`bool(t)`, `t.item()`, `t.tolist()`, `t.cpu()`) or making
a tensor from host data (a blocking copy) makes the host wait until the GPU has done all the
work queued so far, so the GPU idles while the host queues the next work. The streaming passes
keep such waits to one per batch (docs/devices.md, "Measured on one NVIDIA H200"); this module
counts them, on CUDA with torch's sync debug mode and on any device by recording the calls.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostTransfers", "count_synchronisations", "cuda_synchronisations", "device_index"]


@functools.lru_cache(maxsize=256)
def _cached_index(indices: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long, device=device)


def device_index(indices: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Positions as an index tensor on `device`, made once per device and kept: copying them
    from the host at every batch or step would synchronise a GPU each time. Shared between
    callers: read it, never write to it."""
    return _cached_index(tuple(int(i) for i in indices), torch.device(device))


class HostTransfers(TorchFunctionMode):
    """Record, in order, the calls that would synchronise a GPU with the host: reads of a
    tensor's values into Python (`reads`) and tensors made from host data (`torch.tensor`),
    with the batched products (`bmm`) to place them. On a CPU nothing waits; recorded there,
    the calls say what a GPU would wait on."""

    READS = frozenset(
        {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy"}
    )
    MARKS = READS | {"tensor", "as_tensor", "bmm"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        name = getattr(func, "__name__", "")
        if name in self.MARKS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> list[str]:
        return [c for c in self.calls if c in self.READS]

    @property
    def waits(self) -> int:
        """Reads plus tensors made from host data: what a GPU would wait on."""
        return len(self.reads) + self.calls.count("tensor") + self.calls.count("as_tensor")


def count_synchronisations(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Times `fn()` makes the host wait for `device`: counted by torch's sync debug mode on
    CUDA; elsewhere, the calls that would (`HostTransfers.waits`)."""
    if torch.device(device).type != "cuda":
        with HostTransfers() as seen:
            fn()
        return seen.waits
    return len(cuda_synchronisations(fn, device))


def cuda_synchronisations(fn: Callable[[], Any], device: torch.device | str = "cuda") -> list[str]:
    """The Python lines (`file:line`) whose operations made the host wait for the CUDA
    `device` during `fn()`, one per wait, as torch's sync debug mode reports them."""
    from pathlib import Path

    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
