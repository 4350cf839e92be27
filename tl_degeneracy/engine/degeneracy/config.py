"""Settings of the SGLD estimate of the local learning coefficient: fixed (`SGLDConfig`) or
chosen by pilot chains as part of the run (`CalibrationConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass


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

    def __post_init__(self) -> None:  # JSON gives lists: keep the config hashable
        object.__setattr__(
            self, "step_scales", tuple((str(p), float(f)) for p, f in self.step_scales)
        )

    def nbeta(self, n: int) -> float:
        """nβ for a data set of n points."""
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
    R-hat is above `SGLDConfig.rhat_max` and the budget allows.
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
    max_steps: int = 6400
    """Most steps per chain of the estimate."""
