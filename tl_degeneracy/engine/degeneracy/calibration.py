"""How much an SGLD estimate depends on its hyperparameters: λ̂ over a grid of step sizes
(with the largest trustworthy one recommended) and over step sizes × inverse temperatures."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.degeneracy.config import SGLDConfig, SGLDWarning
from tl_degeneracy.engine.degeneracy.diagnostics import LLCResult
from tl_degeneracy.engine.degeneracy.problems import LLCProblem
from tl_degeneracy.engine.degeneracy.sgld import estimate_llc


@dataclass(repr=False)
class CalibrationResult(BriefRepr):
    """λ̂ over a grid of step sizes, and the largest step size that can be trusted."""

    results: list[LLCResult]
    recommended: float | None
    """Largest step size whose chains neither diverged nor failed R-hat, and whose λ̂ agrees
    with the next smaller such step size within `tolerance` (relative) or 3 standard errors."""

    @property
    def step_sizes(self) -> list[float]:
        return [r.config.step_size for r in self.results]

    def table(self) -> str:
        rows = ["| ε | λ̂ | se | R-hat | diverged |", "|---|---|---|---|---|"]
        for r in self.results:
            rows.append(
                f"| {r.config.step_size:g} | {r.llc:.4g} | {r.llc_se:.2g} | {r.rhat:.3f} | "
                f"{int(r.diverged.sum())}/{len(r.diverged)} |"
            )
        return "\n".join(rows)


def agree(a: LLCResult, b: LLCResult, tolerance: float) -> bool:
    """λ̂ of `a` and `b` within `tolerance` of b's (relative) or 3 combined standard errors."""
    se = math.hypot(a.llc_se, b.llc_se) if math.isfinite(a.llc_se * b.llc_se) else 0.0
    return abs(a.llc - b.llc) <= max(tolerance * abs(b.llc), 3 * se)


def calibrate_step_size(
    problem: LLCProblem,
    config: SGLDConfig | None = None,
    step_sizes: Sequence[float] = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
    tolerance: float = 0.1,
) -> CalibrationResult:
    """Estimate λ̂ at each step size with the same chains (`config`) and recommend the largest
    stable one. Each diverging or unconverged setting warns (`SGLDWarning`); so does a grid
    with no trustworthy step size. `calibrated_llc` chooses the step size as part of a run."""
    cfg = config or SGLDConfig()
    results = [estimate_llc(problem, replace(cfg, step_size=s)) for s in sorted(step_sizes)]
    stable = [
        r
        for r in results
        if not bool(r.diverged.any()) and not (r.rhat > cfg.rhat_max) and math.isfinite(r.llc)
    ]
    recommended = None
    if len(stable) == 1:
        recommended = stable[0].config.step_size
    for small, big in zip(stable, stable[1:]):
        if agree(big, small, tolerance):
            recommended = big.config.step_size
    if recommended is None:
        warnings.warn(
            "no step size in the grid gave converged, agreeing SGLD chains "
            f"({', '.join(f'{s:g}' for s in sorted(step_sizes))}): extend the grid to smaller "
            "step sizes or run longer chains",
            SGLDWarning,
            stacklevel=2,
        )
    return CalibrationResult(results, recommended)


def sensitivity_grid(
    problem: LLCProblem,
    config: SGLDConfig | None = None,
    step_sizes: Sequence[float] = (3e-5, 1e-4, 3e-4),
    nbetas: Sequence[float | None] = (None,),
    progress: bool = False,
    skip_own: bool = False,
) -> list[LLCResult]:
    """λ̂ for every (step size, nβ) pair: how much the estimate depends on its
    hyperparameters. An entry None in `nbetas` means the default β = 1/log n. `skip_own`
    leaves out the pair equal to `config`'s own setting (nβ within 0.1%), already estimated
    by the caller."""
    cfg = config or SGLDConfig()
    own = cfg.nbeta(problem.sample_size)
    out = []
    for nbeta in nbetas:
        beta = None if nbeta is None else nbeta / problem.sample_size
        for eps in step_sizes:
            run = replace(cfg, step_size=eps, beta=beta)
            if (
                skip_own
                and eps == cfg.step_size
                and math.isclose(run.nbeta(problem.sample_size), own, rel_tol=1e-3)
            ):
                continue
            out.append(estimate_llc(problem, run, progress))
    return out
