"""Elapsed time and ETA of a long job, phase by phase (the tqdm bars show progress within a
pass; this clock logs one line per pass and keeps the timings that results record)."""

from __future__ import annotations

import time
from collections.abc import Callable

Log = Callable[[str], None]


def quiet(_: str) -> None:
    """A log that prints nothing."""


class JobClock:
    """Elapsed time and ETA per phase, logged once per pass."""

    def __init__(self, log: Log = quiet):
        self.log, self.start = log, time.perf_counter()
        self.phase_start: dict[str, float] = {}
        self.restored: dict[str, int] = {}
        self.timings: dict[str, float] = {}

    def begin(self, phase: str) -> None:
        self.phase_start[phase] = time.perf_counter()
        self.restored[phase] = 0

    def step(self, phase: str, done: int, total: int, what: str, restored: bool = False) -> None:
        """Log a finished item of `phase`. A `restored` one (read back from a checkpoint)
        took no time, so the ETA is the time per item computed here, not per item done."""
        spent = time.perf_counter() - self.phase_start[phase]
        self.restored[phase] = self.restored.get(phase, 0) + restored
        worked = done - self.restored[phase]
        eta = spent / worked * (total - done) if worked else float("nan")
        self.log(
            f"[{phase} {done}/{total}] {what}{' (restored)' if restored else ''}  elapsed "
            f"{_fmt(time.perf_counter() - self.start)}, {phase} ETA {_fmt(eta)}"
        )

    def end(self, phase: str) -> float:
        spent = time.perf_counter() - self.phase_start[phase]
        self.timings[f"{phase}_s"] = self.timings.get(f"{phase}_s", 0.0) + spent
        return spent


def _fmt(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"
