"""Bad input to the degeneracy functions is a clear error naming the problem and the fix, not a
silent wrong answer or an error from deep inside; `torch.no_grad()`, frozen parameters and
other dtypes behave as documented."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from tl_degeneracy.engine.capture import NonFiniteActivationError
from tl_degeneracy.engine.degeneracy import (
    AdditivityResult,
    CalibrationConfig,
    ModelProblem,
    SGLDConfig,
    SGLDWarning,
    SourcesConfig,
    degeneracy_report,
    estimate_llc,
    measure_sources,
    model_llc,
)
from tl_degeneracy.engine.degeneracy.ground_truth import linear_regression_problem
from tl_degeneracy.engine.degeneracy.report import SectionReport

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::tl_degeneracy.engine.degeneracy.SGLDWarning"),
]

FAST = SGLDConfig(step_size=1e-4, n_chains=2, n_steps=20, n_burnin=5, batch_size=16)


def totals(sources):
    return {s: sources.section_free(s) for s in sources.sections}


# -- 1. positions ----------------------------------------------------------------------------


def test_positions_outside_the_sequence_are_an_error(api, tiny, tokens_for):
    model = tiny(api, "mlp")
    tokens = tokens_for(model, 8)  # 4 positions
    for pos in [(4,), (100,), (-5,)]:
        with pytest.raises(ValueError, match="outside sequences of 4 tokens"):
            measure_sources(model, tokens, SourcesConfig(positions=pos))
        with pytest.raises(ValueError, match="outside sequences of 4 tokens"):
            ModelProblem(model, tokens, None, pos)
    # in range, negative ones count from the end
    assert ModelProblem(model, tokens, None, (-1, 1)).query_positions == (3, 1)
    a = measure_sources(model, tokens, SourcesConfig(positions=(-1,), batch_size=8))
    b = measure_sources(model, tokens, SourcesConfig(positions="last", batch_size=8))
    assert totals(a) == totals(b)


@pytest.mark.parametrize("positions", [(), "first", 3, (1.5,), (True,)])
def test_positions_must_be_last_all_or_integers(positions):
    with pytest.raises(ValueError, match="positions must be"):
        SourcesConfig(positions=positions)


def test_a_list_of_positions_becomes_a_tuple():
    assert SourcesConfig(positions=[0, 2]).positions == (0, 2)  # type: ignore[arg-type]


# -- 2 and 3. SGLD settings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("step_size", 0.0, "step_size must be a positive"),
        ("step_size", -1e-4, "step_size must be a positive"),
        ("step_size", float("nan"), "step_size must be a positive"),
        ("step_size", float("inf"), "step_size must be a positive finite"),
        ("gamma", -100.0, "gamma must be a non-negative"),
        ("beta", -1.0, "beta must be a positive"),
        ("beta", 0.0, "beta must be a positive"),
        ("n_chains", 0, "n_chains must be at least 1"),
        ("n_chains", -2, "n_chains must be at least 1"),
        ("n_chains", 2.5, "n_chains must be an integer"),
        ("n_steps", 0, "n_steps must be at least 1"),
        ("n_burnin", -1, "n_burnin must be at least 0"),
        ("n_burnin", 400, "n_burnin .400. must be less than n_steps .400."),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("rhat_max", 0.5, "rhat_max must be at least 1"),
        ("explode_factor", 0.0, "explode_factor must be a positive"),
        ("step_scales", (("(", 1.0),), "not a regex"),
        ("step_scales", (("mlp", 0.0),), "must be a positive"),
    ],
)
def test_bad_sgld_settings_are_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        SGLDConfig(**{field: value})


def test_gamma_zero_is_plain_sgld_and_allowed():
    assert SGLDConfig(gamma=0.0).gamma == 0.0


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("step_sizes", (), "non-empty"),
        ("step_sizes", (1e-3, 0.0), "every step size in step_sizes"),
        ("pilot_steps", 0, "pilot_steps must be at least 1"),
        ("pilot_chains", 0, "pilot_chains must be at least 1"),
        ("tolerance", -0.1, "tolerance must be a positive"),
        ("max_total_steps", 0, "max_total_steps must be at least 1"),
        ("max_seconds", 0.0, "max_seconds must be a positive"),
        ("max_steps", 0, "max_steps must be at least 1"),
        ("lower_gamma", -1, "lower_gamma must be at least 0"),
        ("lower_gamma", 1.5, "lower_gamma must be an integer"),
        ("min_relaxations", -1.0, "min_relaxations must be a non-negative"),
        ("discretisation_check", "yes", "discretisation_check must be True or False"),
    ],
)
def test_bad_calibration_settings_are_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        CalibrationConfig(**{field: value})


def test_settings_from_json_lists_stay_hashable():
    cfg = SGLDConfig(step_scales=[["mlp", 2]])  # type: ignore[list-item]
    assert cfg.step_scales == (("mlp", 2.0),)
    assert CalibrationConfig(step_sizes=[1e-3, 1e-4]).step_sizes == (1e-3, 1e-4)  # type: ignore[arg-type]
    hash(cfg)


def test_one_data_point_is_an_error_naming_beta():
    with pytest.raises(ValueError, match="β = 1/log n needs n ≥ 2"):
        SGLDConfig().nbeta(1)
    assert SGLDConfig(beta=0.5).nbeta(1) == 0.5  # a given β needs no log n
    problem = linear_regression_problem(2, 1)
    with pytest.raises(ValueError, match="give more data"):
        estimate_llc(problem, FAST)


# -- 4. torch.no_grad ------------------------------------------------------------------------


def test_sources_and_sgld_switch_gradients_on_themselves(api, tiny, tokens_for):
    model = tiny(api, "mlp")
    tokens = tokens_for(model, 16)
    config = SourcesConfig(batch_size=16)
    want = totals(measure_sources(model, tokens, config))
    want_llc = model_llc(model, tokens, FAST)
    with torch.no_grad():
        assert totals(measure_sources(model, tokens, config)) == want
        got = model_llc(model, tokens, FAST)
    assert torch.equal(got.loss_traces, want_llc.loss_traces)
    with torch.set_grad_enabled(False):
        assert totals(measure_sources(model, tokens, config)) == want
        got = estimate_llc(ModelProblem(model, tokens), FAST)
        report = degeneracy_report(model, tokens, config, FAST, llc="total")
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    assert torch.equal(got.loss_traces, want_llc.loss_traces)
    assert torch.equal(report.total.llc.loss_traces, want_llc.loss_traces)


# -- 5. requires_grad ------------------------------------------------------------------------


def test_every_parameter_is_measured_whatever_its_requires_grad(api, tiny, tokens_for):
    """requires_grad is autograd's bookkeeping (notebooks switch it off to save memory), not a
    choice of what to measure: a frozen model gives the same report, and keeps its flags."""
    model = tiny(api, "mlp")
    tokens = tokens_for(model, 16)
    config = SourcesConfig(batch_size=16)
    want = degeneracy_report(model, tokens, config, FAST, llc="total")
    frozen = {n for n, p in model.named_parameters() if ".mlp." in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    partly = degeneracy_report(model, tokens, config, FAST, llc="total")
    model.requires_grad_(False)
    fully = degeneracy_report(model, tokens, config, FAST, llc="total")
    for got in (partly, fully):
        assert got.total.n_params == want.total.n_params
        assert got.total.free == want.total.free
        assert got.total.llc.n_params == want.total.llc.n_params
        assert torch.equal(got.total.llc.loss_traces, want.total.llc.loss_traces)
    assert not any(p.requires_grad for p in model.parameters())


# -- 6. report and sources settings ----------------------------------------------------------


def test_bad_report_choices_are_errors(api, tiny, tokens_for):
    model = tiny(api, "mlp")
    tokens = tokens_for(model, 8)
    with pytest.raises(ValueError, match="llc must be one of all, total, none; got 'some'"):
        degeneracy_report(model, tokens, llc="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calibration must be"):
        degeneracy_report(model, tokens, calibration="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -1.0}, "eps must be a non-negative"),
        ({"eps": float("nan")}, "eps must be a non-negative"),
        ({"eps": 1.0}, "eps must be below 1 with the relative cutoff"),
        ({"eps_grid": (1e-3, -1e-3)}, "eps_grid must be a non-negative"),
        ({"cutoff": "abs"}, "cutoff must be 'relative' or 'absolute'"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"n_probes": 0}, "n_probes must be at least 1"),
        ({"sync_tolerance": -0.1}, "sync_tolerance must be a non-negative"),
        ({"metric": "kl"}, "metric must be a function"),
    ],
)
def test_bad_sources_settings_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SourcesConfig(**kwargs)


def test_an_absolute_cutoff_may_exceed_one():
    assert SourcesConfig(eps=5.0, cutoff="absolute").eps == 5.0


# -- 7. dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_with_the_fix(api, tiny, tokens_for, dtype):
    model = tiny(api, "mlp").to(dtype)
    tokens = tokens_for(model, 8)
    with pytest.raises(ValueError, match=r"float32 or float64 .*deepcopy\(model\)\.double\(\)"):
        measure_sources(model, tokens)
    with pytest.raises(ValueError, match=r"float32 or float64 .*sgld_dtype=torch\.float32"):
        model_llc(model, tokens, FAST)
    with pytest.raises(ValueError, match=r"float32 or float64 .*\.double\(\)"):
        degeneracy_report(model, tokens, llc="none")


# -- 8. models without a cfg -------------------------------------------------------------------


class Tiny(HookedRootModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 10)
        self.hook_pre = HookPoint()
        self.setup()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.hook_pre(self.embed(tokens)))


def test_models_without_a_cfg_are_refused_with_a_pointer_to_function_problem():
    model, tokens = Tiny(), torch.randint(0, 10, (8, 3))
    for run in (
        lambda: measure_sources(model, tokens),
        lambda: model_llc(model, tokens, FAST),
        lambda: degeneracy_report(model, tokens, llc="none"),
    ):
        with pytest.raises(TypeError, match="Tiny has no `cfg`.*FunctionProblem"):
            run()


# -- 9. notes and reprs ------------------------------------------------------------------------


def _result(**changes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        r = estimate_llc(linear_regression_problem(2, 200), dataclasses.replace(FAST, **changes))
    return r


def _section(llc) -> SectionReport:
    return SectionReport("mlp", 10, {}, 8, torch.zeros(1, dtype=torch.int64), llc)


def test_a_diverged_run_is_not_called_stable():
    r = _result(step_size=10.0)
    assert bool(r.diverged.all())
    note = _section(r).note()
    assert note is not None
    assert "Best stable" not in note and "No setting was stable" in note
    assert "2 of 2 chains diverged" in note


def test_a_fixed_run_is_called_the_setting_run():
    r = _result(rhat_max=1.0)  # converged chains fail R-hat ≤ 1
    note = _section(r).note()
    assert note is not None and "Setting run: ε = 0.0001" in note


def test_small_n_eff_above_the_bound_is_printed_with_its_digits():
    r = dataclasses.replace(_result(), llc=0.00075)
    assert "N_eff 0.0015 above the bound N − free = 0" in r.unconverged_reasons(0)
    big = dataclasses.replace(r, llc=617.2)
    assert "N_eff 1,234 above the bound N − free = 10" in big.unconverged_reasons(10)


def test_additivity_result_has_a_short_repr():
    r = _result()
    text = repr(AdditivityResult(r, {"a": r, "b": r}))
    assert text.startswith("AdditivityResult(λ̂(whole) = ") and "gap" in text
    assert "tensor" not in text and len(text) < 300


def test_a_nan_unembedding_is_named_before_the_eigensolver(api, tiny, tokens_for):
    """A NaN in W_U leaves every activation finite but the logits NaN; the gradient source used
    to fail inside `eigvalsh` with torch's own LinAlgError."""
    model = tiny(api, "mlp")
    weight = model.unembed.W_U if hasattr(model.unembed, "W_U") else model.unembed.weight
    with torch.no_grad():
        weight[(0,) * weight.ndim] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="site logits, batch 0.*model's weights"):
        measure_sources(model, tokens_for(model, 8))


def test_one_section_may_be_named_by_a_string(api, tiny, tokens_for):
    """`sections="blocks.0.mlp"` used to be read letter by letter ("unknown sections ['b',
    'l', ...]")."""
    model = tiny(api, "mlp")
    tokens = tokens_for(model, 8)
    one = measure_sources(model, tokens, sections="blocks.0.mlp")
    assert one.sections == ["blocks.0.mlp"]
    assert totals(one) == totals(measure_sources(model, tokens, sections=["blocks.0.mlp"]))
    report = degeneracy_report(model, tokens, llc="none", sections="blocks.0.mlp")
    assert [s.name for s in report.sections] == ["blocks.0.mlp"]


def test_a_row_without_an_estimate_names_the_gamma_its_calibration_reached():
    """The search gave up at γ = 1 with no estimate there: the row's setting used to read "—"."""
    from tl_degeneracy.engine.degeneracy import CalibratedLLC, DegeneracyReport

    cal = CalibratedLLC(None, [], None, notes=["the budget left no room for the estimate"])
    cal.higher_gammas = [{"gamma": 100.0, "gamma_low": 10.0}, {"gamma": 10.0, "gamma_low": 1.0}]
    free = dict.fromkeys(["activations", "gradients", "joint", "synchronised", "dead"], 0)
    section = dataclasses.replace(_section(None), calibration=cal, free=free)
    total = dataclasses.replace(section, name="total", calibration=None)
    report = DegeneracyReport([section], total, 1e-6, "relative", [1e-6], 10)
    rows = report.rows()
    assert rows[0]["ε, γ, steps"] == "none at γ = 1" and rows[1]["ε, γ, steps"] == "—"
