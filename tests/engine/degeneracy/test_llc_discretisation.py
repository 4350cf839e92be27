"""The step-size check of a calibrated estimate (`discretisation`) and the chains' minimum
length, one relaxation time of the localisation (`calibrated.relaxation_steps`)."""

from __future__ import annotations

import warnings

import pytest

from tl_degeneracy.engine.degeneracy import (
    CalibrationConfig,
    SGLDConfig,
    SGLDWarning,
    calibrated_llc,
    discretisation_check,
    estimate_llc,
)
from tl_degeneracy.engine.degeneracy.calibrated import relaxation_steps
from tl_degeneracy.engine.degeneracy.ground_truth import (
    deep_linear_network,
    deep_linear_problem,
    linear_regression_problem,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_bias_that_builds_up_over_the_chains_moves_the_step_size_down():
    """A deep linear network 10-20-20-10 (r = 3, λ = 50) at γ = 10: the pilots at ε = 1e-4
    and 3e-5 agree over their 200 steps, but chains of 1,600 steps at 1e-4 read λ̂ ≈ 64.
    Chains at 3e-5 over the same Langevin time read ≈ 50, so the estimate moves to 3e-5,
    whose own check at 1e-5 passes."""
    problem = deep_linear_problem([10, 20, 20, 10], r=3, n=20000)
    truth = 2 * deep_linear_network([10, 20, 20, 10], 3).llc  # λ as a fraction: 50
    cfg = SGLDConfig(gamma=10.0, n_chains=2, n_steps=1600, n_burnin=400)
    cal = CalibrationConfig(
        step_sizes=(1e-4, 3e-5, 1e-5),
        localisation_ratio=None,
        lower_gamma=0,
        min_relaxations=0,
        max_steps=1600,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", SGLDWarning)
        found = calibrated_llc(problem, cfg, cal)
    assert found.pilots[0].step_size == 1e-4 and found.pilots[0].agrees_with_next
    assert found.chosen == 3e-5 and found.converged
    (note,) = found.notes
    assert note.startswith("at ε = 0.0001 λ̂ depends on the step size: ")
    check = found.discretisation
    assert check is not None and check.passed and check.step_size_fine == 1e-5
    assert check.n_steps_fine == 3 * 1600 and found.result is not None
    assert found.result.llc == pytest.approx(truth / 2, rel=0.15)


def test_the_check_compares_the_same_langevin_time():
    problem = linear_regression_problem(4, n=1000)
    cfg = SGLDConfig(step_size=1e-3, gamma=1.0, n_chains=2, n_steps=300, n_burnin=100)
    result = estimate_llc(problem, cfg)
    check = discretisation_check(problem, result, 2.5e-4, n_chains=3)
    assert (check.n_steps_fine, check.n_chains, check.steps) == (1200, 3, 3600)
    assert check.passed and check.reason() is None
    assert check.llc_fine == pytest.approx(2.0, rel=0.2)
    with pytest.raises(ValueError, match="must be below the estimate's step size 0.001"):
        discretisation_check(problem, result, 1e-3)


def test_chains_run_one_relaxation_time_of_the_localisation():
    cal = CalibrationConfig()
    assert relaxation_steps(SGLDConfig(step_size=1e-4, gamma=10.0), cal) == 2000
    scaled = SGLDConfig(step_size=1e-4, gamma=10.0, step_scales=(("mlp", 0.1), ("embed", 1.0)))
    assert relaxation_steps(scaled, cal) == 20000  # the slowest parameters set the length
    assert relaxation_steps(SGLDConfig(gamma=0.0), cal) == 0
    assert relaxation_steps(SGLDConfig(gamma=10.0), CalibrationConfig(min_relaxations=0)) == 0


def test_chains_that_cannot_relax_within_max_steps_are_not_a_result():
    problem = linear_regression_problem(4, n=1000)
    cal = CalibrationConfig(step_sizes=(1e-3, 3e-4), lower_gamma=0, max_steps=800)
    with pytest.warns(SGLDWarning, match="need 2,000 steps to relax"):
        found = calibrated_llc(problem, SGLDConfig(gamma=1.0), cal)
    assert found.result is None and not found.converged
