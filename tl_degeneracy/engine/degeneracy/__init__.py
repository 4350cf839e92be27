"""Degeneracy of the loss landscape (Paper A; see the degeneracy page of the docs).

The three sources of free directions, per weight map and section:
- `spectra`: ranks and null directions with a finite-data cutoff ε, curves over ε;
- `groups`: synchronised neurons and heads, dead neurons;
- `weight_maps`: the weight maps of a TransformerLens model and its sections;
- `sources`: the results (`SourcesConfig`, `MapSources`, `SourcesResult`);
- `measure`: `measure_sources`, the forward and backward passes that fill them.

The local learning coefficient λ̂ by SGLD, N_eff = 2λ̂:
- `parameters`: which parameters (or entries) move;
- `problems`: the losses (`FunctionProblem`, `ModelProblem`, the behavioural loss);
- `config`: `SGLDConfig`, `CalibrationConfig`;
- `sgld`: the sampler (`estimate_llc`, `continue_llc`, `model_llc`);
- `diagnostics`: `LLCResult`, R-hat, whether an estimate is a result;
- `calibration`: λ̂ over step sizes and temperatures (`calibrate_step_size`,
  `sensitivity_grid`);
- `calibrated`: `calibrated_llc`, the estimate that chooses its own step size and length;
- `discretisation`: `discretisation_check` (does λ̂ depend on the step size?);
- `localisation`: `localisation_check` (does λ̂ depend on the localisation γ?);
- `temperature`: `temperature_fit` (λ and the multiplicity from several nβ);
- `additivity`: do modules add their λ̂?

And: `ground_truth` (learning coefficients known in closed form), `report` and
`build_report` (`DegeneracyReport`, `degeneracy_report`), `invariance` (planted modules under
a rotation), `crosscheck` (the same estimate by devinterp's sampler, an optional dependency).
"""

from tl_degeneracy.engine.degeneracy.additivity import (
    AdditivityResult,
    additivity,
    model_additivity,
    sections_partition,
)
from tl_degeneracy.engine.degeneracy.build_report import degeneracy_report, section_report
from tl_degeneracy.engine.degeneracy.calibrated import CalibratedLLC, Pilot, calibrated_llc
from tl_degeneracy.engine.degeneracy.calibration import (
    CalibrationResult,
    calibrate_step_size,
    sensitivity_grid,
)
from tl_degeneracy.engine.degeneracy.config import CalibrationConfig, SGLDConfig, SGLDWarning
from tl_degeneracy.engine.degeneracy.diagnostics import LLCResult, split_rhat
from tl_degeneracy.engine.degeneracy.discretisation import (
    DiscretisationCheck,
    discretisation_check,
)
from tl_degeneracy.engine.degeneracy.groups import HeadGroups, NeuronGroups, pattern_groups
from tl_degeneracy.engine.degeneracy.localisation import LocalisationCheck, localisation_check
from tl_degeneracy.engine.degeneracy.measure import measure_sources
from tl_degeneracy.engine.degeneracy.parameters import (
    ParamFilter,
    parameter_masks,
    select_parameters,
)
from tl_degeneracy.engine.degeneracy.problems import FunctionProblem, LLCProblem, ModelProblem
from tl_degeneracy.engine.degeneracy.report import DegeneracyReport, SectionReport, plot_llc_results
from tl_degeneracy.engine.degeneracy.sgld import continue_llc, estimate_llc, model_llc
from tl_degeneracy.engine.degeneracy.sources import MapSources, SourcesConfig, SourcesResult
from tl_degeneracy.engine.degeneracy.spectra import (
    joint_free_weights,
    null_directions,
    nullity,
    nullity_curve,
)
from tl_degeneracy.engine.degeneracy.temperature import TemperatureFit, temperature_fit
from tl_degeneracy.engine.degeneracy.weight_maps import WeightMap, section_filter, weight_maps

__all__ = [
    "AdditivityResult",
    "CalibratedLLC",
    "CalibrationConfig",
    "CalibrationResult",
    "DegeneracyReport",
    "DiscretisationCheck",
    "FunctionProblem",
    "HeadGroups",
    "LLCProblem",
    "LLCResult",
    "LocalisationCheck",
    "MapSources",
    "ModelProblem",
    "NeuronGroups",
    "ParamFilter",
    "Pilot",
    "SGLDConfig",
    "SGLDWarning",
    "SectionReport",
    "SourcesConfig",
    "SourcesResult",
    "TemperatureFit",
    "WeightMap",
    "additivity",
    "calibrate_step_size",
    "calibrated_llc",
    "continue_llc",
    "degeneracy_report",
    "discretisation_check",
    "estimate_llc",
    "joint_free_weights",
    "localisation_check",
    "measure_sources",
    "model_additivity",
    "model_llc",
    "null_directions",
    "nullity",
    "nullity_curve",
    "parameter_masks",
    "pattern_groups",
    "plot_llc_results",
    "section_filter",
    "section_report",
    "sections_partition",
    "select_parameters",
    "sensitivity_grid",
    "split_rhat",
    "temperature_fit",
    "weight_maps",
]
