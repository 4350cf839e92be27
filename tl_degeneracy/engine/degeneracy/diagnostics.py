"""An SGLD estimate with its traces, and whether it may be shown as a result: the split
Gelman–Rubin R-hat, diverged chains, and the section's upper bound `N − free`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.degeneracy.config import SGLDConfig

if TYPE_CHECKING:
    from tl_degeneracy.engine.degeneracy.sgld import ChainState


@dataclass(repr=False)
class LLCResult(BriefRepr):
    """An SGLD estimate of the LLC with its traces and diagnostics."""

    llc: float
    """λ̂ = nβ (E[L] − L(w*)), averaged over the chains that did not diverge."""
    llc_se: float
    """Standard error of λ̂: standard deviation across chains / √chains."""
    llc_per_chain: Float[Tensor, " chain"]
    loss_traces: Float[Tensor, "chain step"]
    """Minibatch loss at every step (before the update), NaN after a divergence."""
    diverged: Bool[Tensor, " chain"]
    rhat: float
    """Split R-hat of the post-burn-in loss traces (≈1 when the chains agree)."""
    loss_at_star: float
    n: int
    nbeta: float
    n_params: int
    config: SGLDConfig
    seconds: float
    param_names: tuple[str, ...] = ()
    messages: list[str] = field(default_factory=list)
    """The warnings issued for this estimate."""
    state: ChainState | None = field(default=None, repr=False, compare=False)
    """Where the chains stopped (not saved): `continue_llc` runs them longer."""

    @property
    def n_eff(self) -> float:
        """Effective parameter count 2λ̂."""
        return 2 * self.llc

    @property
    def n_eff_se(self) -> float:
        return 2 * self.llc_se

    @property
    def llc_traces(self) -> Float[Tensor, "chain step"]:
        """nβ (L_t − L(w*)) per chain and step: the per-step LLC estimate."""
        return self.nbeta * (self.loss_traces - self.loss_at_star)

    @property
    def steps_per_second(self) -> float:
        steps = self.config.n_steps * self.config.n_chains
        return steps / self.seconds if self.seconds > 0 else float("nan")

    def unconverged_reasons(self, bound: float | None = None) -> list[str]:
        """Why this estimate is not a result (empty when it is): λ̂ not finite or negative, a
        chain diverged, R-hat above `config.rhat_max`, or N_eff above `bound` (a section's
        `N − free`, which no effective parameter count can exceed)."""
        out = []
        if not math.isfinite(self.llc):
            out.append("λ̂ is not finite")
        elif self.llc < 0:
            out.append(f"λ̂ = {self.llc:.3g} < 0")
        n_div = int(self.diverged.sum())
        if n_div:
            out.append(f"{n_div} of {len(self.diverged)} chains diverged")
        if not self.rhat <= self.config.rhat_max:
            out.append(f"R-hat {self.rhat:.3f} > {self.config.rhat_max:g}")
        if bound is not None and math.isfinite(self.llc) and self.n_eff > bound:
            out.append(f"N_eff {count_text(self.n_eff)} above the bound N − free = {bound:,.0f}")
        return out

    def summary(self) -> str:
        return (
            f"λ̂ = {self.llc:.4g} ± {self.llc_se:.2g} (N_eff = {self.n_eff:.4g} ± "
            f"{self.n_eff_se:.2g} of {self.n_params} parameters); R-hat {self.rhat:.3f}; "
            f"{int(self.diverged.sum())}/{len(self.diverged)} chains diverged; "
            f"ε={self.config.step_size:g}, γ={self.config.gamma:g}, nβ={self.nbeta:.4g}, "
            f"{self.steps_per_second:.1f} steps/s"
        )

    def to_json(self) -> dict[str, Any]:
        """Scalars and settings (arrays go through `arrays()`)."""
        return {
            "llc": self.llc,
            "llc_se": self.llc_se,
            "rhat": self.rhat,
            "loss_at_star": self.loss_at_star,
            "n": self.n,
            "nbeta": self.nbeta,
            "n_params": self.n_params,
            "config": asdict(self.config),
            "seconds": self.seconds,
            "param_names": list(self.param_names),
            "messages": list(self.messages),
        }

    def arrays(self) -> dict[str, Tensor]:
        return {
            "llc_per_chain": self.llc_per_chain,
            "loss_traces": self.loss_traces,
            "diverged": self.diverged.to(torch.uint8),
        }

    @classmethod
    def from_parts(cls, meta: Mapping[str, Any], arrays: Mapping[str, Tensor]) -> LLCResult:
        meta = dict(meta)
        config = SGLDConfig(**meta.pop("config"))
        meta["param_names"] = tuple(meta.get("param_names", ()))
        return cls(
            llc_per_chain=arrays["llc_per_chain"],
            loss_traces=arrays["loss_traces"],
            diverged=arrays["diverged"].bool(),
            config=config,
            **meta,
        )


def count_text(x: float) -> str:
    """A parameter count as text: whole from 100 on (1,234), else 3 significant digits (0.0015)."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def split_rhat(traces: Float[Tensor, "chain step"]) -> float:
    """Gelman–Rubin R-hat on split chains (each chain cut in two halves)."""
    t = traces.shape[1] // 2
    if t < 2:
        return float("nan")
    halves = torch.cat([traces[:, :t], traces[:, t : 2 * t]]).to(torch.float64)
    within = halves.var(1).mean()
    between = t * halves.mean(1).var()
    if within <= 0:
        return 1.0 if between <= 0 else float("inf")
    var_hat = (t - 1) / t * within + between / t
    return float(torch.sqrt(var_hat / within))
