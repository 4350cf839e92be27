"""Settings of the SGLD estimate of the local learning coefficient: fixed (`SGLDConfig`) or
chosen by pilot chains as part of the run (`CalibrationConfig`)."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any


class SGLDWarning(UserWarning):
    """SGLD chains diverged or did not converge: the estimate is not trustworthy."""


@dataclass(frozen=True)
class SGLDConfig:
    """Hyperparameters of the SGLD estimate of the LLC."""

    step_size: float = 1e-4
    """ε: SGLD step size (the noise has variance ε)."""
    gamma: float = 100.0
    """γ: strength of the localisation term γ/2 ‖w − w*‖²."""
    beta: float | None = None
    """Inverse temperature per sample; the posterior uses nβ. None: β = 1/log n."""
    n_chains: int = 4
    n_steps: int = 400
    """Steps per chain, burn-in included."""
    n_burnin: int = 100
    """Steps dropped from the start of each chain before averaging."""
    batch_size: int = 512
    """Minibatch size (the whole data set when ≥ n)."""
    seed: int = 0
    rhat_max: float = 1.1
    """Warn when the split R-hat of the loss traces exceeds this."""
    explode_factor: float = 10.0
    """A chain has diverged when nβ (L − L*) exceeds this times the number of parameters
    (a regular minimum has nβ (L − L*) ≈ d/2), or the loss is not finite."""
    step_scales: tuple[tuple[str, float], ...] = ()
    """Per-parameter multipliers of `step_size`: (regex searched in the parameter's name,
    factor), the first match wins, 1 where none matches. A constant preconditioner: the chains
    sample the same posterior, each group of parameters at its own pace (the whole model's
    estimate uses each section's calibrated step size)."""

    def __post_init__(self) -> None:
        positive("step_size", self.step_size, "e.g. 1e-4, or leave it to calibration")
        non_negative("gamma", self.gamma, "e.g. 100; it pulls the chains back to w*")
        if self.beta is not None:
            positive("beta", self.beta, "or None for 1/log n")
        for name in ("n_chains", "n_steps", "batch_size"):
            object.__setattr__(self, name, count(name, getattr(self, name), 1))
        object.__setattr__(self, "n_burnin", count("n_burnin", self.n_burnin, 0))
        object.__setattr__(self, "seed", count("seed", self.seed, None))
        if self.n_burnin >= self.n_steps:
            raise ValueError(
                f"n_burnin ({self.n_burnin}) must be less than n_steps ({self.n_steps}): the "
                "estimate averages the steps after the burn-in; lower n_burnin or raise n_steps"
            )
        if not self.rhat_max >= 1:  # NaN fails too
            raise ValueError(f"rhat_max must be at least 1 (R-hat ≥ 1), got {self.rhat_max}")
        positive("explode_factor", self.explode_factor, "e.g. 10", finite=False)
        scales = []
        for entry in self.step_scales:  # JSON gives lists: keep the config hashable
            pattern, factor = entry
            try:
                re.compile(str(pattern))
            except re.error as error:
                raise ValueError(f"step_scales: {pattern!r} is not a regex ({error})") from None
            scales.append((str(pattern), positive(f"step_scales[{pattern!r}]", factor)))
        object.__setattr__(self, "step_scales", tuple(scales))

    def nbeta(self, n: int) -> float:
        """nβ for a data set of n points."""
        if n < 1:
            raise ValueError(f"the SGLD estimate needs data, got n = {n} loss terms")
        if self.beta is None and n < 2:
            raise ValueError(
                f"β = 1/log n needs n ≥ 2 loss terms (log 1 = 0), got n = {n}: give more data "
                "(e.g. more rows), or set beta"
            )
        beta = self.beta if self.beta is not None else 1.0 / math.log(n)
        return n * beta


@dataclass(frozen=True)
class CalibrationConfig:
    """How a calibrated estimate (`calibrated_llc`) chooses its step size and chain length.

    Pilot chains compare each candidate step size ε with the next smaller one ε' over the same
    Langevin time `ε × pilot_steps`: chains that follow the same diffusion for the same time
    estimate the same quantity whatever their step size, once the discretisation is fine, even
    before they have converged. The largest ε whose pilot is stable and agrees with the pilot
    at ε' is chosen. The estimate then runs `SGLDConfig.n_chains` chains of
    `SGLDConfig.n_steps` steps, doubling their length (the chains continue) while the split
    R-hat is above `SGLDConfig.rhat_max` and the budget allows. Last, chains at a smaller γ
    check that λ̂ does not depend on the localisation (`localisation_ratio`).
    """

    step_sizes: tuple[float, ...] = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
    """Candidate step sizes (tried from the largest down)."""
    pilot_steps: int = 200
    """Steps of the pilot at the larger step size of a pair (the smaller one runs the same
    Langevin time, so more steps); long enough for an unstable step size to show it."""
    pilot_chains: int = 2
    tolerance: float = 0.2
    """Two pilots agree when their λ̂ differ by at most this (relative; a discretisation error
    of O(ε) then leaves at most about 1.5 × this in λ̂ at the chosen ε); the estimate's chains
    agree when its standard error is at most half this times λ̂."""
    max_total_steps: int = 60_000
    """Budget of one calibrated estimate: SGLD steps over all pilots and chains."""
    max_seconds: float | None = None
    """Wall-clock budget of one calibrated estimate (None: `max_total_steps` only)."""
    max_steps: int = 12_800
    """Most steps per chain of the estimate."""
    localisation_ratio: float | None = 10.0
    """The localisation check (`localisation.localisation_check`): `pilot_chains` chains at
    γ / this, with the estimate's step size and steps, must give λ̂ within `tolerance` of the
    estimate's, else the estimate depends on γ and is not a result. None: no check."""
    lower_gamma: int = 2
    """How many times γ may be divided by `localisation_ratio` when the localisation check
    fails (the estimate at the lower γ is calibrated anew, from the step size chosen above
    it, and checked at the next lower γ in turn); 0: never. A linear regression held at
    γ = 100 (λ̂ 3.21 for λ = 5) reads 5.00 at γ = 10."""
    min_relaxations: float = 1.0
    """The estimate's chains run at least this many relaxation times of the localisation,
    `2/(εγ)` steps (ε the smallest step any parameter takes): the time the chains need to
    spread out to the localisation's scale. Shorter chains read λ̂ low however well they agree
    (reduced-rank regression (4,3,4,1), γ = 10, ε = 1e-4: λ̂ 5.30 after 400 steps, 5.94 after
    1,000 and 5.91 after 2,000, for λ = 6). 0: no minimum."""
    discretisation_check: bool = True
    """End the estimate with `pilot_chains` chains at the next smaller step size for its whole
    Langevin time (`discretisation.discretisation_check`); if λ̂ moves by more than
    `tolerance`, the smaller step size is tried. The pilots compare step sizes over a short
    time only, and a bias that builds up over the chains (a deep linear network at ε = 1e-4:
    λ̂ 64 for λ = 50, against 50 at 3e-5) shows only over their whole length."""

    def __post_init__(self) -> None:
        if isinstance(self.step_sizes, (int, float)) or not len(self.step_sizes):
            raise ValueError(
                f"step_sizes must be a non-empty sequence of step sizes, got {self.step_sizes!r}"
            )
        sizes = tuple(
            positive("every step size in step_sizes", e, "e.g. (1e-3, 1e-4)")
            for e in self.step_sizes
        )
        object.__setattr__(self, "step_sizes", sizes)
        for name in ("pilot_steps", "pilot_chains", "max_total_steps", "max_steps"):
            object.__setattr__(self, name, count(name, getattr(self, name), 1))
        positive("tolerance", self.tolerance, "e.g. 0.2 (relative)")
        if self.max_seconds is not None:
            positive("max_seconds", self.max_seconds, "or None for no time limit", finite=False)
        if self.localisation_ratio is not None and not self.localisation_ratio > 1:
            raise ValueError(
                f"localisation_ratio must be above 1 (or None), got {self.localisation_ratio}"
            )
        object.__setattr__(self, "lower_gamma", count("lower_gamma", self.lower_gamma, 0))
        non_negative("min_relaxations", self.min_relaxations, "e.g. 1.0, or 0 for no minimum")
        if not isinstance(self.discretisation_check, bool):
            raise ValueError(
                f"discretisation_check must be True or False, got {self.discretisation_check!r}"
            )


def positive(name: str, value: Any, hint: str = "", finite: bool = True) -> float:
    """`value` as a float, or a ValueError naming `name` unless it is > 0 (and finite)."""
    return _number(name, value, hint, finite, lambda x: x > 0, "a positive")


def non_negative(name: str, value: Any, hint: str = "", finite: bool = True) -> float:
    """`value` as a float, or a ValueError naming `name` unless it is ≥ 0 (and finite)."""
    return _number(name, value, hint, finite, lambda x: x >= 0, "a non-negative")


def _number(name: str, value: Any, hint: str, finite: bool, ok: Any, what: str) -> float:
    kind = f"{what} {'finite ' if finite else ''}number"
    fix = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {kind}, got {value!r}{fix}")
    x = float(value)
    if math.isnan(x) or (finite and math.isinf(x)) or not ok(x):
        raise ValueError(f"{name} must be {kind}, got {value!r}{fix}")
    return x


def count(name: str, value: Any, minimum: int | None) -> int:
    """`value` as an int, or a ValueError naming `name` unless it is an integer ≥ `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)
