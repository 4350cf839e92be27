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
        self.timings: dict[str, float] = {}

    def begin(self, phase: str) -> None:
        self.phase_start[phase] = time.perf_counter()

    def step(self, phase: str, done: int, total: int, what: str) -> None:
        spent = time.perf_counter() - self.phase_start[phase]
        eta = spent / done * (total - done) if done else float("nan")
        self.log(
            f"[{phase} {done}/{total}] {what}  elapsed {_fmt(time.perf_counter() - self.start)}"
            f", {phase} ETA {_fmt(eta)}"
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
