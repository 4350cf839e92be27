"""Degeneracy of the loss landscape (Paper A; docs/degeneracy.md).

- `sources`: the three sources of free directions per weight map and section, with a
  finite-data cutoff ε and curves over ε;
- `llc`: the local learning coefficient λ̂ of the behavioural loss by SGLD, N_eff = 2λ̂,
  restricted to any parameter subset, with diagnostics, calibration and modularity;
- `ground_truth`: learning coefficients known in closed form (regular models, reduced-rank
  regression, deep linear networks) and test problems built on them;
- `report`: `DegeneracyReport`, everything above per section and in total;
- `crosscheck`: the same estimate by devinterp's sampler (optional dependency).
"""

from tl_degeneracy.engine.degeneracy.llc import (
    CalibrationResult,
    FunctionProblem,
    LLCProblem,
    LLCResult,
    ModelProblem,
    ModularityResult,
    SGLDConfig,
    SGLDWarning,
    calibrate_step_size,
    estimate_llc,
    model_llc,
    modularity,
    select_parameters,
    sensitivity_grid,
    temperature_fit,
)
from tl_degeneracy.engine.degeneracy.report import (
    DegeneracyReport,
    SectionReport,
    degeneracy_report,
    plot_llc_results,
)
from tl_degeneracy.engine.degeneracy.sources import (
    HeadGroups,
    MapSources,
    NeuronGroups,
    SourcesConfig,
    SourcesResult,
    WeightMap,
    joint_free_weights,
    measure_sources,
    null_directions,
    nullity,
    nullity_curve,
    pattern_groups,
    weight_maps,
)

__all__ = [
    "CalibrationResult",
    "DegeneracyReport",
    "FunctionProblem",
    "HeadGroups",
    "LLCProblem",
    "LLCResult",
    "MapSources",
    "ModelProblem",
    "ModularityResult",
    "NeuronGroups",
    "SGLDConfig",
    "SGLDWarning",
    "SectionReport",
    "SourcesConfig",
    "SourcesResult",
    "WeightMap",
    "calibrate_step_size",
    "degeneracy_report",
    "plot_llc_results",
    "estimate_llc",
    "joint_free_weights",
    "measure_sources",
    "model_llc",
    "modularity",
    "null_directions",
    "nullity",
    "nullity_curve",
    "pattern_groups",
    "select_parameters",
    "sensitivity_grid",
    "temperature_fit",
    "weight_maps",
]
