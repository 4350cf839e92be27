"""Does an SGLD estimate depend on its localisation γ?

The sampler draws from `exp(−nβ L(w) − γ/2 ‖w − w*‖²)`. Near a minimum, a direction of
curvature h contributes `(1/2) nβh / (nβh + γ)` to λ̂ instead of 1/2: when `nβh` is not much
larger than γ the localisation, not the loss, holds the chains, and λ̂ reads low (linear
regression, d = 10, nβ = 145, γ = 100: 5 × 145/245 = 2.96 instead of 5). Nothing in the
chains themselves shows it — they converge and agree — so the check compares: chains at
γ / ratio, the same step size, steps and burn-in, against the estimate. If λ̂ moves by more
than `tolerance` (relative to the value at the smaller γ), the estimate measures the
localisation and is not a result.

Directions with `nβh ≫ γ` give the same λ̂ at both γ; flat directions (h = 0) give 0 at both;
only the directions the localisation holds move, by about 90% of their bias at γ for
ratio 10 (a direction with `nβh = γ` reads 1/4 at γ and 0.45 at γ/10).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from tl_degeneracy.engine.degeneracy.diagnostics import LLCResult
from tl_degeneracy.engine.degeneracy.problems import LLCProblem
from tl_degeneracy.engine.degeneracy.sgld import estimate_llc


@dataclass(frozen=True)
class LocalisationCheck:
    """λ̂ of an estimate at its γ and of a few chains at a smaller γ, same step size and
    steps; `passed` when they agree within `tolerance` (relative to the smaller γ's λ̂)."""

    gamma: float
    llc: float
    """The estimate's λ̂ (at `gamma`)."""
    gamma_low: float
    llc_low: float
    llc_low_se: float
    diverged_low: int
    """Chains at `gamma_low` that diverged."""
    n_chains: int
    n_steps: int
    tolerance: float
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        """SGLD steps the check cost."""
        return self.n_chains * self.n_steps

    @property
    def precise(self) -> bool:
        """Whether the check's chains agree as closely as an estimate's must (standard error at
        most half the tolerance × λ̂): a noisier check cannot tell a shift from noise."""
        return self.llc_low_se <= self.tolerance / 2 * abs(self.llc_low)

    @property
    def passed(self) -> bool:
        if self.diverged_low or not math.isfinite(self.llc_low):
            return False
        close = abs(self.llc - self.llc_low) <= self.tolerance * abs(self.llc_low)
        return close and self.precise

    def reason(self) -> str | None:
        """Why the estimate is not a result (None: the check passed)."""
        if self.passed:
            return None
        if not self.diverged_low and math.isfinite(self.llc_low) and not self.precise:
            return (
                f"the localisation check is inconclusive: its {self.n_chains} chains at γ = "
                f"{self.gamma_low:g} disagree ({self.llc_low:.4g} ± {self.llc_low_se:.2g}, "
                f"against {self.llc:.4g} at γ = {self.gamma:g}): lower gamma or run longer chains"
            )
        low = (
            f"{self.diverged_low} of {self.n_chains} chains diverged at γ = {self.gamma_low:g}"
            if self.diverged_low or not math.isfinite(self.llc_low)
            else f"{self.llc_low:.4g} ± {self.llc_low_se:.2g} at γ = {self.gamma_low:g}"
        )
        return (
            f"λ̂ depends on the localisation γ: {self.llc:.4g} at γ = {self.gamma:g}, {low} "
            f"(same ε and steps; more than {self.tolerance:g} apart): raise nβ (more data) or "
            "lower gamma"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> LocalisationCheck:
        return cls(**meta)


def localisation_check(
    problem: LLCProblem,
    result: LLCResult,
    ratio: float = 10.0,
    n_chains: int = 2,
    tolerance: float = 0.2,
    min_steps: int = 0,
) -> LocalisationCheck:
    """Run `n_chains` chains at γ / `ratio` with `result`'s step size, steps, burn-in and seed
    on `problem`, and compare their λ̂ with `result.llc` (costs `n_chains × n_steps` steps).
    `min_steps` lengthens the chains (the burn-in in proportion): chains at the lower γ take
    `ratio` times longer to spread out to its scale (`calibrated.relaxation_steps`), and
    chains cut short read the same λ̂ at both γ, passing the check whatever the truth."""
    cfg = result.config
    n_steps = max(cfg.n_steps, min_steps)
    n_burnin = round(cfg.n_burnin * n_steps / cfg.n_steps)
    low = estimate_llc(
        problem,
        replace(
            cfg, gamma=cfg.gamma / ratio, n_chains=n_chains, n_steps=n_steps, n_burnin=n_burnin
        ),
        warn=False,
    )
    return LocalisationCheck(
        gamma=cfg.gamma,
        llc=result.llc,
        gamma_low=cfg.gamma / ratio,
        llc_low=low.llc,
        llc_low_se=low.llc_se,
        diverged_low=int(low.diverged.sum()),
        n_chains=n_chains,
        n_steps=n_steps,
        tolerance=tolerance,
        seconds=low.seconds,
    )
