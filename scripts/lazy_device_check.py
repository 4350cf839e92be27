"""Run the `gpu` tests on a second device without a GPU: PyTorch's lazy TorchScript backend.

A tensor left on the CPU beside the model's is the usual way code fails on a GPU, and CPU-only
tests cannot see it. The lazy backend (`torch._lazy`, in the CPU wheel) is a second device
that computes on the CPU and refuses to mix its tensors with CPU ones, as CUDA does. This
script runs every test that takes a `device` argument in the device test modules with
`device="lazy"` and prints PASS or FAIL with the deepest package frame.

    python scripts/lazy_device_check.py

It is a proxy, not a GPU: the backend has quirks of its own, worked around here (`unbind`
and `split` views; random generators, which the backend lacks: draws are made on the CPU and
copied over) or avoided (the closed forms are switched off with `autograd_only`, because index ops
inside them trip the backend; their device handling is checked on CUDA only).
`torch._lazy` is private API: if a torch release drops it, this script says so and stops.
docs/devices.md lists what it found.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("engine.test_devices", "experiments.test_lm_edges_required")
NOT_EMULATED = {
    "test_attention_and_mlp_sites_on_device": "asserts the closed forms, switched off here",
}


def start_lazy_backend() -> None:
    try:
        import torch._lazy
        import torch._lazy.ts_backend
    except ImportError as error:  # pragma: no cover - a torch without the lazy backend
        raise SystemExit(f"this torch has no lazy backend ({error}); run on a GPU") from error
    torch._lazy.ts_backend.init()
    _work_around_quirks()


def _work_around_quirks() -> None:
    """The backend's own bugs (not the package's): views made by `unbind` and `split` read as
    CPU tensors, and `torch.Generator` has no lazy device."""
    unbind = torch.Tensor.unbind

    def lazy_unbind(self: torch.Tensor, dim: int = 0):
        if self.device.type == "lazy":
            return tuple(self.select(dim, i).clone() for i in range(self.shape[dim]))
        return unbind(self, dim)

    torch.Tensor.unbind = lazy_unbind  # type: ignore[method-assign,assignment]
    torch.unbind = lambda t, dim=0: lazy_unbind(t, dim)  # type: ignore[assignment]

    split = torch.Tensor.split

    def lazy_split(self: torch.Tensor, size, dim: int = 0):
        if self.device.type != "lazy":
            return split(self, size, dim)
        n = self.shape[dim]
        sizes = [size] * -(-n // size) if isinstance(size, int) else list(size)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return tuple(
            self.narrow(dim, start, min(s, n - start)).clone() for start, s in zip(starts, sizes)
        )

    torch.Tensor.split = lazy_split  # type: ignore[method-assign,assignment]

    generator, randint = torch.Generator, torch.randint

    class LazyGenerator:
        """A CPU generator whose draws are moved to the lazy device."""

        def __init__(self, device: str | torch.device) -> None:
            self.cpu, self.device = generator(), torch.device(device)

        def manual_seed(self, seed: int) -> LazyGenerator:
            self.cpu.manual_seed(seed)
            return self

        def get_state(self) -> torch.Tensor:
            return self.cpu.get_state()

        def set_state(self, state: torch.Tensor) -> None:
            self.cpu.set_state(state)

    class Generator:
        def __new__(cls, device: str | torch.device = "cpu"):  # type: ignore[misc]
            if torch.device(device).type == "lazy":
                return LazyGenerator(device)
            return generator(device=device)

    def lazy_randint(*args, generator=None, device=None, **kwargs):
        if isinstance(generator, LazyGenerator):
            return randint(*args, generator=generator.cpu, **kwargs).to(generator.device)
        if device is not None:
            kwargs["device"] = device
        return randint(*args, generator=generator, **kwargs)

    normal_ = torch.Tensor.normal_

    def lazy_normal_(self: torch.Tensor, mean=0.0, std=1.0, *, generator=None):
        if isinstance(generator, LazyGenerator):
            cpu = torch.empty(self.shape, dtype=self.dtype)
            return self.copy_(normal_(cpu, mean, std, generator=generator.cpu))
        return normal_(self, mean, std, generator=generator)

    torch.Generator = Generator  # type: ignore[misc,assignment]
    torch.randint = lazy_randint  # type: ignore[assignment]
    torch.Tensor.normal_ = lazy_normal_  # type: ignore[method-assign,assignment]


def run_module(name: str) -> list[bool]:
    from tl_degeneracy.engine.compat import available_apis

    module = importlib.import_module(name.rsplit(".", 1)[-1])
    passed = []
    for test_name, fn in inspect.getmembers(module, inspect.isfunction):
        params = inspect.signature(fn).parameters
        if not test_name.startswith("test_") or "device" not in params:
            continue
        for api in available_apis() if "api" in params else [None]:
            kwargs: dict = {"device": "lazy"}
            if api is not None:
                kwargs["api"] = api
            if "tmp_path" in params:
                kwargs["tmp_path"] = Path(tempfile.mkdtemp())
            if "dtype" in params:
                kwargs["dtype"] = torch.float32
            label = f"{name}.{test_name}" + (f"[{api}]" if api else "")
            passed.append(run_one(label, fn, kwargs, NOT_EMULATED.get(test_name, "")))
    return passed


def run_one(label: str, fn, kwargs: dict, expected_failure: str) -> bool:
    """Run one test with the closed forms off; True when it passes or fails as expected."""
    from tl_degeneracy.engine.structures import autograd_only

    start = time.perf_counter()
    try:
        with autograd_only():
            fn(**kwargs)
    except Exception as error:
        frames = traceback.extract_tb(error.__traceback__)
        where = [f"{Path(f.filename).name}:{f.lineno}" for f in frames][-3:]
        print(f"FAIL {label}: {type(error).__name__}: {str(error)[:100]} {where}")
        if expected_failure:
            print(f"     (expected here: {expected_failure})")
        return bool(expected_failure)
    print(f"PASS {label} ({time.perf_counter() - start:.1f} s)")
    return True


def main() -> int:
    start_lazy_backend()
    for folder in ("tests", "tests/engine", "tests/experiments"):
        sys.path.insert(0, str(ROOT / folder))
    results = [ok for name in MODULES for ok in run_module(name)]
    print(f"{sum(results)} of {len(results)} passed or failed as expected")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
