"""Do proposed modules add their learning coefficients? (Paper A's degeneracy view of
modularity.)

If the loss near w* is a sum of functions of each module's parameters, the localised
posterior factorises and `λ(whole) = Σ λ(module)`, where "whole" is the union of the modules'
parameters and each module's λ is measured with the others held at w*. Interactions between
modules make the two differ. A partition maps module names to parameter filters: sections
(`sections_partition`), names, or masks over entries (some neurons, heads, or a block of the
residual stream).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.degeneracy.calibrated import calibrated_llc
from tl_degeneracy.engine.degeneracy.config import CalibrationConfig, SGLDConfig
from tl_degeneracy.engine.degeneracy.diagnostics import LLCResult
from tl_degeneracy.engine.degeneracy.parameters import ParamFilter, parameter_masks, union
from tl_degeneracy.engine.degeneracy.problems import Divergence, LLCProblem, ModelProblem
from tl_degeneracy.engine.degeneracy.sgld import estimate_llc
from tl_degeneracy.engine.degeneracy.weight_maps import section_filter


@dataclass(repr=False)
class AdditivityResult:
    """λ̂ of the union of modules against the sum of the modules' own λ̂.

    If the loss near w* is a sum of functions of each module's parameters (independent
    modules), λ(whole) = Σ λ(module). Interactions make the two differ.
    """

    whole: LLCResult
    modules: dict[str, LLCResult]

    @property
    def sum_of_modules(self) -> float:
        return sum(r.llc for r in self.modules.values())

    @property
    def sum_se(self) -> float:
        return math.sqrt(sum(r.llc_se**2 for r in self.modules.values()))

    @property
    def gap(self) -> float:
        """Σ λ̂(module) − λ̂(whole)."""
        return self.sum_of_modules - self.whole.llc

    @property
    def gap_se(self) -> float:
        return math.hypot(self.sum_se, self.whole.llc_se)

    @property
    def ratio(self) -> float:
        """λ̂(whole) / Σ λ̂(module): 1 for independent modules."""
        return self.whole.llc / self.sum_of_modules

    def __repr__(self) -> str:  # the numbers, not every chain's trace
        return f"AdditivityResult({self.summary()})"

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {r.llc:.4g} ± {r.llc_se:.2g}" for k, r in self.modules.items())
        return (
            f"λ̂(whole) = {self.whole.llc:.4g} ± {self.whole.llc_se:.2g}; Σ modules = "
            f"{self.sum_of_modules:.4g} ± {self.sum_se:.2g} ({parts}); gap "
            f"{self.gap:.3g} ± {self.gap_se:.2g}"
        )


def additivity(
    make_problem: Callable[[ParamFilter], LLCProblem],
    modules: Mapping[str, ParamFilter],
    config: SGLDConfig | None = None,
    calibration: CalibrationConfig | None = None,
) -> AdditivityResult:
    """Compare λ̂ over the union of `modules` (parameter filters) with the sum of λ̂ over each
    module alone (the rest held at w*). `make_problem(filter)` builds the loss restricted to a
    filter, e.g. `lambda f: ModelProblem(model, tokens, f)`. With `calibration` every estimate
    chooses its own step size and length (`calibrated_llc`; `config` gives the rest) and an
    estimate that is not a result raises, since the comparison would be meaningless."""

    def run(f: ParamFilter) -> LLCResult:
        problem = make_problem(f)
        if calibration is None:
            return estimate_llc(problem, config)
        cal = calibrated_llc(problem, config, calibration)
        if cal.result is None or cal.reasons:
            raise RuntimeError(f"a calibrated estimate did not converge: {cal.reasons}")
        return cal.result

    per_module = {name: run(f) for name, f in modules.items()}
    whole = run(union(list(modules.values())))
    return AdditivityResult(whole, per_module)


def sections_partition(groups: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Modules made of whole sections: module name → sections ("embed", "blocks.0.mlp", ...),
    as one parameter filter per module."""
    return {m: "|".join(f"(?:{section_filter(s)})" for s in secs) for m, secs in groups.items()}


def model_additivity(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    partition: Mapping[str, ParamFilter],
    config: SGLDConfig | None = None,
    calibration: CalibrationConfig | None = None,
    positions: Literal["last", "all"] | tuple[int, ...] = "last",
    divergence: Divergence = "kl",
) -> AdditivityResult:
    """`additivity` of a TransformerLens model's behavioural loss over a partition of (some
    of) its parameters: module name → filter (a regex, names, or masks over entries; see
    `sections_partition` for sections). Modules must not share entries."""
    masks = {m: parameter_masks(model, f) for m, f in partition.items()}
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = [
                n for n in masks[a] if n in masks[b] and bool((masks[a][n] & masks[b][n]).any())
            ]
            if shared:
                raise ValueError(f"modules {a!r} and {b!r} share entries of {shared[:3]}")
    return additivity(
        lambda f: ModelProblem(model, tokens, f, positions, divergence),
        masks,
        config,
        calibration,
    )
