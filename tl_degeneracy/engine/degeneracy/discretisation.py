"""Does an SGLD estimate depend on its step size, over its whole length?

The calibration's pilots compare two step sizes over a short Langevin time (200 steps at the
larger). A discretisation bias that builds up as the chains travel further does not show
there: a deep linear network (10-20-20-10, r = 3, λ = 50, γ = 10) reads λ̂ = 64 at ε = 1e-4
over 1,600 steps and 50 at ε = 3e-5 over the same Langevin time, yet their pilots agreed.
So the estimate ends with chains at the next smaller step size ε' for the estimate's whole
Langevin time (`n_steps × ε/ε'` steps, the burn-in scaled alike); if their λ̂ differs by more
than `tolerance` (relative to the finer one), the step size is too large for this chain
length and the next smaller one is tried.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from tl_degeneracy.engine.degeneracy.diagnostics import LLCResult
from tl_degeneracy.engine.degeneracy.problems import LLCProblem
from tl_degeneracy.engine.degeneracy.sgld import estimate_llc


@dataclass(frozen=True)
class DiscretisationCheck:
    """λ̂ of an estimate at its step size and of a few chains at a smaller one over the same
    Langevin time; `passed` when they agree within `tolerance` (relative to the finer λ̂)."""

    step_size: float
    llc: float
    """The estimate's λ̂ (at `step_size`)."""
    step_size_fine: float
    llc_fine: float
    llc_fine_se: float
    diverged_fine: int
    n_chains: int
    n_steps_fine: int
    tolerance: float
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        """SGLD steps the check cost."""
        return self.n_chains * self.n_steps_fine

    @property
    def passed(self) -> bool:
        if self.diverged_fine or not math.isfinite(self.llc_fine):
            return False
        return abs(self.llc - self.llc_fine) <= self.tolerance * abs(self.llc_fine)

    def reason(self) -> str | None:
        """Why the estimate is not a result (None: the check passed)."""
        if self.passed:
            return None
        fine = (
            f"{self.diverged_fine} of {self.n_chains} chains diverged at ε = "
            f"{self.step_size_fine:g}"
            if self.diverged_fine or not math.isfinite(self.llc_fine)
            else f"{self.llc_fine:.4g} ± {self.llc_fine_se:.2g} at ε = {self.step_size_fine:g}"
        )
        return (
            f"λ̂ depends on the step size: {self.llc:.4g} at ε = {self.step_size:g}, {fine} "
            f"over the same Langevin time ({self.n_steps_fine} steps; more than "
            f"{self.tolerance:g} apart)"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> DiscretisationCheck:
        return cls(**meta)


def discretisation_check(
    problem: LLCProblem,
    result: LLCResult,
    step_size_fine: float,
    n_chains: int = 2,
    tolerance: float = 0.2,
) -> DiscretisationCheck:
    """Run `n_chains` chains at `step_size_fine` for `result`'s Langevin time (its steps and
    burn-in times `ε / step_size_fine`), γ, nβ and seed on `problem`, and compare their λ̂
    with `result.llc` (costs `n_chains × n_steps × ε / step_size_fine` steps)."""
    cfg = result.config
    if not 0 < step_size_fine < cfg.step_size:
        raise ValueError(
            f"step_size_fine must be below the estimate's step size {cfg.step_size:g}, got "
            f"{step_size_fine!r}"
        )
    ratio = cfg.step_size / step_size_fine
    n_steps = round(cfg.n_steps * ratio)
    n_burnin = min(n_steps - 1, round(cfg.n_burnin * ratio))
    fine = estimate_llc(
        problem,
        replace(
            cfg,
            step_size=step_size_fine,
            n_chains=n_chains,
            n_steps=n_steps,
            n_burnin=n_burnin,
        ),
        warn=False,
    )
    return DiscretisationCheck(
        step_size=cfg.step_size,
        llc=result.llc,
        step_size_fine=step_size_fine,
        llc_fine=fine.llc,
        llc_fine_se=fine.llc_se,
        diverged_fine=int(fine.diverged.sum()),
        n_chains=n_chains,
        n_steps_fine=n_steps,
        tolerance=tolerance,
        seconds=fine.seconds,
    )
