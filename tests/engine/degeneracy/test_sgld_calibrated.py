"""Longer chains, automatic step sizes, and when an estimate is not a result."""

from __future__ import annotations

import warnings

import pytest
import torch

from tl_degeneracy.engine.compat import available_apis, hooked_state_dict
from tl_degeneracy.engine.degeneracy import (
    CalibratedLLC,
    CalibrationConfig,
    FunctionProblem,
    ModelProblem,
    SGLDConfig,
    SGLDWarning,
    calibrated_llc,
    continue_llc,
    estimate_llc,
)
from tl_degeneracy.engine.degeneracy.calibrated import minimum_budget
from tl_degeneracy.engine.degeneracy.ground_truth import linear_regression_problem, quartic_problem
from tl_degeneracy.engine.degeneracy.parameters import state_dict_parameters


def test_continued_chains_equal_one_longer_run_batched():
    problem = linear_regression_problem(4, n=500)
    cfg = SGLDConfig(step_size=1e-3, gamma=1.0, n_chains=3, n_steps=40, n_burnin=10, batch_size=50)
    long = estimate_llc(problem, SGLDConfig(**{**cfg.__dict__, "n_steps": 100, "n_burnin": 25}))
    short = estimate_llc(problem, cfg)
    more = continue_llc(problem, short, 60)
    assert torch.equal(more.loss_traces, long.loss_traces)
    assert more.config == long.config and more.llc == long.llc
    again = continue_llc(problem, short, 60)  # the short run's state is left where it was
    assert torch.equal(again.loss_traces, long.loss_traces)


def test_continued_chains_equal_one_longer_run_on_a_model(tiny, tokens_for):
    model = tiny(available_apis()[0], "mlp")
    problem = ModelProblem(model, tokens_for(model, 40), params=r"^blocks\.0\.mlp\.")
    cfg = SGLDConfig(step_size=1e-3, n_chains=2, n_steps=10, n_burnin=4, batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        long = estimate_llc(problem, SGLDConfig(**{**cfg.__dict__, "n_steps": 25, "n_burnin": 10}))
        more = continue_llc(problem, estimate_llc(problem, cfg), 15)
    assert torch.equal(more.loss_traces, long.loss_traces) and more.llc == long.llc


def test_a_diverged_chain_stays_diverged_when_continued():
    problem = linear_regression_problem(5, n=1000)
    cfg = SGLDConfig(step_size=0.5, gamma=1.0, n_chains=2, n_steps=20, n_burnin=5, batch_size=10**9)
    problem.batched = False  # one chain at a time
    inner = problem.loss_fn
    problem.loss_fn = lambda w, idx: inner(w[None], idx[None])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        more = continue_llc(problem, estimate_llc(problem, cfg), 20)
    assert bool(more.diverged.all()) and bool(more.loss_traces[:, 20:].isnan().all())


def test_unconverged_reasons():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        drifting = estimate_llc(
            quartic_problem(10_000),
            SGLDConfig(step_size=1e-6, gamma=1.0, n_chains=8, n_steps=400, n_burnin=10),
        )
    assert any("R-hat" in r for r in drifting.unconverged_reasons())
    good = estimate_llc(
        linear_regression_problem(4, n=500),
        SGLDConfig(step_size=1e-3, gamma=1.0, n_chains=8, n_steps=2000, n_burnin=500),
    )
    assert good.unconverged_reasons() == []
    assert good.unconverged_reasons(bound=good.n_eff * 1.01) == []
    (reason,) = good.unconverged_reasons(bound=good.n_eff / 2)
    assert "above the bound" in reason


@pytest.mark.parametrize("tolerance, chosen, error", [(0.1, 1e-3, 0.08), (0.2, 3e-3, 0.2)])
def test_calibration_finds_a_step_size_that_gives_the_regular_learning_coefficient(
    tolerance, chosen, error
):
    """Linear regression in d = 10 parameters (λ = 5): the step sizes that diverge (0.1,
    0.03) or inflate λ̂ (0.01: pilot +55%) are rejected; the chosen one's estimate is within
    the discretisation error the tolerance allows (O(ε): about 1.5 × the tolerance at most)."""
    problem = linear_regression_problem(10, n=1000)
    cfg = SGLDConfig(gamma=1.0, n_chains=8, n_steps=500, n_burnin=125, batch_size=10**9)
    grid = (0.1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4)
    cal = CalibrationConfig(
        grid, pilot_chains=32, tolerance=tolerance, max_total_steps=10**6, localisation_ratio=None
    )
    found = calibrated_llc(problem, cfg, cal)
    assert found.converged and found.reasons == [] and found.chosen == chosen
    assert found.result is not None and found.result.config.step_size == chosen
    assert found.result.llc == pytest.approx(5.0, rel=error)
    assert [p.step_size for p in found.pilots[:3]] == [0.1, 0.03, 0.01]
    assert not found.pilots[0].stable and found.pilots[0].diverged == 32
    assert found.pilots[2].stable and found.pilots[2].agrees_with_next is False
    assert [p.agrees_with_next for p in found.pilots if p.step_size == chosen][-1] is True
    smaller = [p for p in found.pilots if p.step_size < chosen]  # the same Langevin time
    assert smaller[-1].n_steps == round(200 * chosen / smaller[-1].step_size)
    assert found.lengths[-1][1] <= cfg.rhat_max


def test_calibration_runs_chains_longer_while_r_hat_asks():
    """Chains of 50 steps are too short at the chosen step size: they continue to 100."""
    problem = linear_regression_problem(10, n=1000)
    cfg = SGLDConfig(gamma=1.0, n_chains=8, n_steps=50, n_burnin=12, batch_size=10**9)
    cal = CalibrationConfig(
        step_sizes=(3e-3, 1e-3), pilot_chains=8, max_steps=3200, min_relaxations=0
    )
    found = calibrated_llc(problem, cfg, cal)
    steps = [n for n, _ in found.lengths]
    assert found.chosen == 3e-3 and steps == [50 * 2**i for i in range(len(steps))]
    assert len(steps) > 1 and found.lengths[0][1] > 1.1 >= found.lengths[-1][1]
    assert found.converged and found.result is not None and found.result.config.n_steps == steps[-1]
    assert found.result.config.n_burnin == steps[-1] * 12 // 50


def test_calibration_that_finds_nothing_says_so():
    problem = linear_regression_problem(4, n=1000)
    cfg = SGLDConfig(gamma=1.0, n_chains=4, n_steps=100, n_burnin=25, batch_size=10**9)
    with pytest.warns(SGLDWarning, match="not converged"):
        found = calibrated_llc(problem, cfg, CalibrationConfig(step_sizes=(1.0, 0.5)))
    assert found.result is None and not found.converged and found.chosen is None
    # a budget below one pilot and the estimate used to run nothing and blame "the budget"
    need = minimum_budget(cfg, CalibrationConfig())
    with pytest.raises(ValueError, match=f"need at least {need:,} steps; raise max_total_steps"):
        calibrated_llc(problem, cfg, CalibrationConfig(max_total_steps=need - 1))
    with pytest.warns(SGLDWarning, match="budget"):
        tight = calibrated_llc(problem, cfg, CalibrationConfig(max_total_steps=need))
    assert not tight.converged and tight.pilots and tight.steps_used <= need


def test_chains_that_only_disagree_run_longer_before_a_smaller_step():
    """Six parameters: each chain's λ̂ is noisy, so short chains disagree. The calibration
    used to answer with ever smaller step sizes (whose chains disagree more) until the budget
    ran out; it now runs the chains longer, and the estimate is a result near the truth."""
    h = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.5, 3.0], dtype=torch.float64)
    problem = FunctionProblem(
        lambda w, idx: 0.5 * (h * w * w).sum(), torch.zeros(6, dtype=torch.float64), 1000
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        # the localisation check left out: this is about the chains at one γ
        found = calibrated_llc(problem, calibration=CalibrationConfig(localisation_ratio=None))
    assert found.result is not None, found.reasons
    g = found.result.config.gamma
    nbeta = found.result.nbeta
    truth = float(sum(0.5 * nbeta * x / (nbeta * x + g) for x in h.tolist()))
    assert len(found.lengths) > 1  # the chains were run longer
    assert found.converged, found.reasons
    assert abs(found.result.llc - truth) < 0.15 * truth


def test_calibration_record_round_trips():
    problem = linear_regression_problem(3, n=500)
    cfg = SGLDConfig(gamma=1.0, n_chains=4, n_steps=200, n_burnin=50, batch_size=10**9)
    found = calibrated_llc(problem, cfg, CalibrationConfig(step_sizes=(1e-2, 3e-3, 1e-3)))
    back = CalibratedLLC.from_json(found.to_json(), found.result)
    assert back.to_json() == found.to_json() and back.reasons == found.reasons


@pytest.mark.parametrize("api", available_apis())
def test_masked_entries_move_alone_and_match_autograd(api, tiny, tokens_for):
    """Masks over entries: an all-true mask is the plain filter (same w*, loss and gradient
    bit for bit); a partial mask moves only its entries, its gradient is the full gradient at
    those entries, and the model is restored."""
    model = tiny(api, "mlp")
    tokens = tokens_for(model, 30)
    named = state_dict_parameters(model)
    name = next(n for n in named if named[n].ndim == 2 and "mlp" in n)
    full_mask = {name: torch.ones_like(named[name], dtype=torch.bool)}
    plain, masked_all = ModelProblem(model, tokens, [name]), ModelProblem(model, tokens, full_mask)
    assert torch.equal(plain.w_star, masked_all.w_star)
    w = plain.w_star * 1.03
    idx = torch.arange(30)
    with plain.bind(w.clone()):
        a = [t.clone() for t in plain.value_and_grad(w, idx)]
    with masked_all.bind(w.clone()):
        b = [t.clone() for t in masked_all.value_and_grad(w, idx)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    mask = torch.zeros_like(full_mask[name])
    mask.view(-1)[::3] = True
    part = ModelProblem(model, tokens, {name: mask})
    assert part.n_params == int(mask.sum())
    v = part.w_star * 1.05
    before = hooked_state_dict(model)
    with part.bind(v.clone()):
        loss, grad = (t.clone() for t in part.value_and_grad(v, idx))
    assert all(torch.equal(before[k], x) for k, x in hooked_state_dict(model).items())
    # the same point through the plain filter: every entry of the weight moves, only some move
    moved = plain.w_star.clone().view_as(named[name])
    moved[mask] = v
    with plain.bind(moved.reshape(-1).clone()):
        loss_full, grad_full = plain.value_and_grad(moved.reshape(-1), idx)
        assert torch.equal(loss, loss_full)
        torch.testing.assert_close(grad, grad_full.view_as(mask)[mask], rtol=1e-12, atol=1e-15)


def test_preconditioned_chains_sample_the_same_posterior():
    """Per-parameter step sizes (a constant preconditioner) leave the posterior, hence λ̂,
    unchanged: linear regression with one coefficient at a tenth of the step size still
    gives d/2."""
    problem = linear_regression_problem(4, n=1000)
    problem.param_names = ("w0", "w1", "w2", "w3")
    cfg = SGLDConfig(1e-3, 1.0, n_chains=64, n_steps=1500, n_burnin=500, batch_size=10**9)
    slow = SGLDConfig(**{**cfg.__dict__, "step_scales": (("^w0$", 0.1),)})
    assert problem.step_vector(slow.step_scales).tolist() == pytest.approx([0.1, 1, 1, 1])
    res = estimate_llc(problem, slow)
    assert res.llc == pytest.approx(2.0, rel=0.06) and res.rhat < 1.1
    assert res.config.step_scales == (("^w0$", 0.1),)


def test_step_scales_follow_the_parameters_of_a_model(tiny, tokens_for):
    model = tiny(available_apis()[0], "mlp")
    problem = ModelProblem(model, tokens_for(model, 10))
    vector = problem.step_vector([(r"^blocks\.0\.mlp\.", 0.5), (r"^unembed\.", 0.25)])
    sizes = dict(zip(problem.param_names, problem.entry_sizes()))
    expected = torch.cat(
        [
            torch.full((sizes[n],), 0.5 if ".mlp." in n else 0.25 if "unembed" in n else 1.0)
            for n in problem.param_names
        ]
    )
    assert torch.equal(vector, expected.to(vector.dtype))
    assert sum(sizes.values()) == problem.n_params
