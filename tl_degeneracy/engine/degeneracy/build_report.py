"""`degeneracy_report`: measure the three sources and the SGLD effective parameter count of a
TransformerLens model per section and in total, into a `DegeneracyReport`."""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from tl_degeneracy.engine.degeneracy.calibrated import CalibratedLLC, calibrated_llc
from tl_degeneracy.engine.degeneracy.calibration import sensitivity_grid
from tl_degeneracy.engine.degeneracy.config import CalibrationConfig, SGLDConfig
from tl_degeneracy.engine.degeneracy.diagnostics import LLCResult
from tl_degeneracy.engine.degeneracy.measure import measure_sources
from tl_degeneracy.engine.degeneracy.problems import Divergence, ModelProblem
from tl_degeneracy.engine.degeneracy.report import SOURCE_KEYS, DegeneracyReport, SectionReport
from tl_degeneracy.engine.degeneracy.sgld import estimate_llc
from tl_degeneracy.engine.degeneracy.sources import SourcesConfig, SourcesResult
from tl_degeneracy.engine.degeneracy.weight_maps import section_filter
from tl_degeneracy.engine.identity import model_identity


def section_report(
    sources: SourcesResult,
    section: str | None,
    llc: LLCResult | None = None,
    calibration: CalibratedLLC | None = None,
) -> SectionReport:
    """Summarise the sources of one section (None: the whole model) into a `SectionReport`."""
    names = sources.sections if section is None else [section]
    free = {k: 0 for k in SOURCE_KEYS}
    for name in names:
        for k, v in sources.section_free(name).items():
            free[k] += v
    details: dict[str, Any] = {}
    eps, cut = sources.config.eps, sources.config.cutoff
    for m in sources.maps:
        if m.map.section in names:
            details[m.map.name] = {
                **m.free(eps, cut),
                "d_in": m.map.d_in,
                "d_out": m.map.d_out,
                "input_site": m.map.input_site,
                "output_site": m.map.output_site,
            }
    for name in names:
        if name in sources.neurons:
            g = sources.neurons[name]
            details[f"{name}/neurons"] = {
                "dead": g.n_dead,
                "always_on": g.n_always_on,
                "switch_neurons": g.n_eligible,
                "group_sizes": g.group_sizes,
            }
        if name in sources.heads:
            details[f"{name}/heads"] = {"groups": sources.heads[name].groups}
    n_params = sum(sources.section_params[n] for n in names)
    return SectionReport(
        name=section or "total",
        n_params=n_params,
        free=free,
        upper_bound=sources.upper_bound(section),
        bound_curve=sources.bound_curve(section),
        llc=llc,
        details=details,
        calibration=calibration,
    )


def degeneracy_report(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    sources_config: SourcesConfig | None = None,
    sgld_config: SGLDConfig | None = None,
    llc: Literal["all", "total", "none"] = "all",
    sections: str | Sequence[str] | None = None,
    divergence: Divergence = "kl",
    sgld_dtype: torch.dtype | None = None,
    sensitivity_step_sizes: Sequence[float] = (),
    sensitivity_nbetas: Sequence[float | None] = (None,),
    progress: bool = False,
    calibration: CalibrationConfig | Literal["auto"] | None = "auto",
) -> DegeneracyReport:
    """Measure the three sources and the SGLD LLC of a TransformerLens model on `tokens`.

    `llc`: "all" runs SGLD for every section (restricted to its parameters) and for the whole
    model, "total" only for the whole model, "none" skips SGLD. `sections` limits the report
    to some sections (names like "blocks.15.mlp", or one name): only their sources are
    measured, and the total (its counts and its SGLD run) covers those sections together, the
    rest of the model held at the trained weights — how a language model's report stays
    tractable.

    SGLD settings: with no `sgld_config` (and `calibration="auto"`) every estimate chooses its
    step size and chain length by `calibrated_llc` with `CalibrationConfig()`, judged against
    the section's bound `N − free`; the whole model then runs each section's parameters at
    that section's step size times a common factor, which is calibrated the same way
    (`SGLDConfig.step_scales`: a constant preconditioner, the same posterior). A given
    `sgld_config` runs exactly those settings (no calibration) unless a `CalibrationConfig` is
    given too (then it supplies chains, γ, nβ, batch and seed). `calibration=None` never
    calibrates.

    The behavioural loss reads the positions `sources_config.positions`. `sgld_dtype` runs
    SGLD on a copy of the model in that dtype (float32 is twice as fast as float64 on a CPU;
    the sources always accumulate in float64, so give them a float64 model).
    `sensitivity_step_sizes` × `sensitivity_nbetas` (None: n / log n) re-estimates the
    total's λ̂ at each other setting (`sensitivity_grid`, around the total's own setting, which
    is skipped). `progress` shows a tqdm bar per SGLD run.

    Every parameter is measured whatever its `requires_grad` (use `sections` to restrict);
    gradients are switched on inside, so a surrounding `torch.no_grad()` does no harm.
    """
    sections = [sections] if isinstance(sections, str) else sections
    if llc not in ("all", "total", "none"):
        raise ValueError(f"llc must be one of all, total, none; got {llc!r}")
    if not (
        calibration is None or calibration == "auto" or isinstance(calibration, CalibrationConfig)
    ):
        raise ValueError(
            f"calibration must be 'auto', a CalibrationConfig or None; got {calibration!r}"
        )
    sources_config = sources_config or SourcesConfig()
    cal = CalibrationConfig() if calibration == "auto" and sgld_config is None else calibration
    cal = cal if isinstance(cal, CalibrationConfig) else None
    sgld_config = sgld_config or SGLDConfig()
    sources = measure_sources(model, tokens, sources_config, sections=sections)
    names = sources.sections
    positions = sources_config.positions
    sampled = model
    if sgld_dtype is not None and sgld_dtype != next(model.parameters()).dtype:
        sampled = copy.deepcopy(model).to(sgld_dtype)

    steps: dict[str, float] = {}  # each section's calibrated step size

    def run(
        problem: ModelProblem, bound: int, section: str | None
    ) -> tuple[LLCResult | None, CalibratedLLC | None]:
        if cal is None:
            return estimate_llc(problem, sgld_config, progress), None
        base, largest = sgld_config, None
        if section is None and steps:  # the whole model: each section at its own pace
            largest = max(steps.values())
            scales = tuple((section_filter(n), e / largest) for n, e in steps.items())
            base = replace(sgld_config, step_scales=scales)
        found = calibrated_llc(problem, base, cal, bound, progress, largest)
        # the whole model moves each section at its step size: the estimate's, else the one
        # its calibration chose (a section without either would move at the largest)
        step = found.result.config.step_size if found.result is not None else found.chosen
        if section is not None and step is not None:
            steps[section] = step
        if progress and found.result is not None:
            r = found.result
            status = "; ".join(found.reasons) or "converged"
            tqdm.write(
                f"{section or 'total'}: ε = {r.config.step_size:g}, {r.config.n_steps} steps, "
                f"N_eff = {r.n_eff:.4g} ± {r.n_eff_se:.2g}, R-hat {r.rhat:.3f} ({status}; "
                f"{found.steps_used:,} steps, {found.seconds:.0f} s)"
            )
        return found.result, found

    reports = []
    for n in names:
        estimate: tuple[LLCResult | None, CalibratedLLC | None] = (None, None)
        if llc == "all":
            part = ModelProblem(sampled, tokens, section_filter(n), positions, divergence)
            estimate = run(part, sources.upper_bound(n), n)
        reports.append(section_report(sources, n, *estimate))
    union = None if sections is None else "|".join(f"(?:{section_filter(n)})" for n in names)
    problem: ModelProblem | None = None  # the total's loss: its estimate and the grid
    if llc in ("all", "total") or sensitivity_step_sizes:
        problem = ModelProblem(sampled, tokens, union, positions, divergence)
    own: tuple[LLCResult | None, CalibratedLLC | None] = (None, None)
    if problem is not None and llc != "none":
        own = run(problem, sources.upper_bound(None), None)
    total = section_report(sources, None, *own)
    grid = []
    if sensitivity_step_sizes and problem is not None:
        around = total.llc.config if total.llc is not None else sgld_config
        grid = sensitivity_grid(
            problem, around, sensitivity_step_sizes, sensitivity_nbetas, progress, skip_own=True
        )
    src_settings = {
        k: v for k, v in asdict(sources_config).items() if k not in ("metric", "eps_grid")
    }
    src_settings["metric"] = None if sources_config.metric is None else repr(sources_config.metric)
    return DegeneracyReport(
        sections=reports,
        total=total,
        eps=sources_config.eps,
        cutoff=sources_config.cutoff,
        eps_grid=list(sources_config.eps_grid),
        n_data=int(tokens.shape[0]),
        model=model_identity(model),
        settings={
            "sources": src_settings,
            "sgld": asdict(sgld_config) if llc != "none" else None,
            "calibration": asdict(cal) if cal is not None and llc != "none" else None,
            "divergence": divergence,
            "sgld_dtype": str(sgld_dtype or next(model.parameters()).dtype),
            "act_fn": sources.act_fn,
            "sections": None if sections is None else list(names),
        },
        versions=_versions(),
        sensitivity=grid,
    )


def _versions() -> dict[str, str]:
    out: dict[str, str] = {"torch": str(torch.__version__)}
    for pkg in ("transformer-lens", "tl_degeneracy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out
