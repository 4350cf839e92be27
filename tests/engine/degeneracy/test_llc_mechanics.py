"""SGLD machinery: warnings, reproducibility, parameter binding, TransformerLens glue."""

from __future__ import annotations

import pytest
import torch

from tl_degeneracy.engine.compat import available_apis, build_model, hooked_state_dict
from tl_degeneracy.engine.degeneracy.calibration import calibrate_step_size
from tl_degeneracy.engine.degeneracy.config import SGLDConfig, SGLDWarning
from tl_degeneracy.engine.degeneracy.diagnostics import split_rhat
from tl_degeneracy.engine.degeneracy.ground_truth import (
    deep_linear_problem,
    linear_regression_problem,
    quartic_problem,
)
from tl_degeneracy.engine.degeneracy.parameters import select_parameters, state_dict_parameters
from tl_degeneracy.engine.degeneracy.problems import ModelProblem
from tl_degeneracy.engine.degeneracy.sgld import estimate_llc, model_llc
from tl_degeneracy.engine.structures import autograd_only

FAST = SGLDConfig(step_size=1e-4, gamma=100.0, n_chains=2, n_steps=40, n_burnin=10, batch_size=32)


def test_divergent_step_size_warns():
    problem = linear_regression_problem(5, n=1000)
    with pytest.warns(SGLDWarning, match="diverged"):
        res = estimate_llc(
            problem,
            SGLDConfig(
                step_size=0.5, gamma=1.0, n_chains=3, n_steps=50, n_burnin=10, batch_size=10**9
            ),
        )
    assert bool(res.diverged.all())
    assert res.messages and "lower step_size" in res.messages[0]


def test_unconverged_chains_warn():
    """Tiny steps from w* = 0 on w1² w2²: the loss is still rising, R-hat flags it."""
    cfg = SGLDConfig(
        step_size=1e-6, gamma=1.0, n_chains=8, n_steps=400, n_burnin=10, batch_size=10**9
    )
    with pytest.warns(SGLDWarning, match="did not converge"):
        res = estimate_llc(quartic_problem(10_000), cfg)
    assert res.rhat > cfg.rhat_max


def test_calibration_recommends_a_stable_step_and_warns_on_the_rest():
    problem = linear_regression_problem(5, n=1000)
    cfg = SGLDConfig(gamma=1.0, n_chains=8, n_steps=3000, n_burnin=1000, batch_size=10**9)
    with pytest.warns(SGLDWarning, match="diverged"):
        cal = calibrate_step_size(problem, cfg, step_sizes=(1e-4, 3e-4, 1.0))
    assert cal.recommended in (1e-4, 3e-4)
    assert "| 1 |" in cal.table()


def test_seeded_and_reproducible():
    problem = linear_regression_problem(4, n=2000)
    cfg = SGLDConfig(step_size=1e-4, gamma=1.0, n_chains=2, n_steps=50, n_burnin=10, batch_size=64)
    a, b = estimate_llc(problem, cfg), estimate_llc(problem, cfg)
    assert torch.equal(a.loss_traces, b.loss_traces)
    c = estimate_llc(problem, SGLDConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(a.loss_traces, c.loss_traces)


def test_split_rhat():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 1000, generator=gen)
    assert split_rhat(noise) == pytest.approx(1.0, abs=0.01)
    drift = noise + torch.linspace(0, 5, 1000)
    assert split_rhat(drift) > 1.3


@pytest.mark.parametrize("api", available_apis())
def test_model_problem_restores_the_model_and_matches_autograd(api, tiny, tokens_for):
    model = tiny(api, "mlp")
    tokens = tokens_for(model, 40)
    before = {k: v.clone() for k, v in hooked_state_dict(model).items()}
    flags = [p.requires_grad for p in model.parameters()]
    res = model_llc(model, tokens, FAST, params=r"^blocks\.0\.mlp\.")
    assert (
        res.n_params
        == sum(p.numel() for n, p in model.named_parameters() if "mlp" in n or "fc_" in n)
        or res.n_params > 0
    )
    after = hooked_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())
    # the flat gradient equals plain autograd at a perturbed point
    problem = ModelProblem(model, tokens)
    w = problem.w_star + 0.01 * torch.randn(
        problem.n_params, generator=torch.Generator().manual_seed(0), dtype=problem.w_star.dtype
    )
    idx = torch.arange(10)
    with problem.bind(w):
        loss, grad = problem.value_and_grad(w, idx)
        grad = grad.clone()
        ref = problem.loss(idx)
        names = problem.param_names
        params = [dict(_by_name(model))[n] for n in names]
        expected = torch.autograd.grad(ref, params)
    assert torch.allclose(grad, torch.cat([g.reshape(-1) for g in expected]))
    assert float(loss) > 0


def _by_name(model):
    return state_dict_parameters(model).items()


def test_position_pruning_is_exact(tiny, tokens_for):
    if "hooked" not in available_apis():
        pytest.skip("pruning applies to HookedTransformer only")
    model = tiny("hooked", "mlp")
    tokens = tokens_for(model, 30)
    with autograd_only():
        pruned = ModelProblem(model, tokens, positions="last")
        full = ModelProblem(model, tokens, positions="last")
    assert pruned.hooks
    full.hooks = []
    assert torch.allclose(pruned.reference, full.reference, atol=1e-12)
    w = pruned.w_star * 1.01
    with pruned.bind(w):
        a = pruned.loss(torch.arange(30))
        b = full.loss(torch.arange(30))
    assert torch.allclose(a, b, atol=1e-12)


def test_both_apis_give_the_same_loss_and_gradient(tiny, tokens_for):
    """Same weights as HookedTransformer and Bridge: the same behavioural loss and gradient
    norm at a point that does not depend on the parameter layout (w = 1.01 w*)."""
    if len(available_apis()) < 2:
        pytest.skip("only one TransformerLens API is installed")
    from support import tiny_config

    hooked = tiny("hooked", "mlp", seed=2)
    bridge = build_model(tiny_config("mlp"), hooked_state_dict(hooked), "bridge", torch.float64)
    tokens = tokens_for(hooked, 40)
    out = []
    for model in (hooked, bridge):
        problem = ModelProblem(model, tokens, params=r"^blocks\.0\.attn\.")
        w = problem.w_star * 1.01
        with problem.bind(w):
            loss, grad = problem.value_and_grad(w, torch.arange(40))
            out.append((problem.n_params, float(loss), float(grad.norm())))
    assert out[0][0] == out[1][0]
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-9)
    assert out[0][2] == pytest.approx(out[1][2], rel=1e-9)


def test_parameter_filters(tiny):
    model = tiny(available_apis()[0], "mlp")
    assert select_parameters(model, r"^unembed\.")
    assert select_parameters(model, lambda n: n.startswith("embed"))
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(model, r"^nothing")
    with pytest.raises(ValueError, match="unknown parameter names"):
        select_parameters(model, ["not.a.name"])


@pytest.mark.skipif("hooked" not in available_apis(), reason="start_at_layer: HookedTransformer")
def test_a_late_block_starts_from_the_cached_residual_stream(tiny, tokens_for):
    """Sampling only block 1 caches the residual stream entering it: same loss and gradient
    as the full forward, at a moved point too."""
    model = tiny("hooked", "ln", n_layers=2)
    tokens = tokens_for(model, 24)
    cached = ModelProblem(model, tokens, params=r"^blocks\.1\.", positions="all")
    full = ModelProblem(model, tokens, params=r"^blocks\.1\.", positions="all", cache_limit=0)
    assert cached.start_layer == 1 and cached.prefix is not None and full.prefix is None
    w = cached.w_star + 0.05 * torch.randn(cached.n_params, dtype=torch.float64)
    idx = torch.arange(0, 24, 2)
    with cached.bind(w.clone()):
        loss_c, grad_c = (t.clone() for t in cached.value_and_grad(w, idx))
    with full.bind(w.clone()):
        loss_f, grad_f = full.value_and_grad(w, idx)
    assert float(loss_f) > 0
    assert torch.allclose(loss_c, loss_f, rtol=1e-12, atol=0)
    assert torch.allclose(grad_c, grad_f, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("api", available_apis())
@pytest.mark.parametrize("n_layers", [1, 2])
def test_written_out_forward_gives_the_model_loss_and_gradient(api, tiny, tokens_for, n_layers):
    """A plain model samples through `PlainModel` (fast); the loss and the flat gradient at
    a moved point equal those of the model's own forward (under `autograd_only()`)."""
    model = tiny(api, "mlp", n_layers=n_layers)
    tokens = tokens_for(model, 30)
    fast = ModelProblem(model, tokens)
    with autograd_only():
        slow = ModelProblem(model, tokens)
    assert fast.plain and not slow.plain
    torch.testing.assert_close(fast.reference, slow.reference, rtol=1e-12, atol=1e-12)
    w = fast.w_star + 0.05 * torch.randn(
        fast.n_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    idx = torch.arange(0, 30, 3)
    with fast.bind(w.clone()):
        loss_f, grad_f = (t.clone() for t in fast.value_and_grad(w, idx))
    with slow.bind(w.clone()):
        loss_s, grad_s = slow.value_and_grad(w, idx)
    assert float(loss_s) > 0
    torch.testing.assert_close(loss_f, loss_s, rtol=1e-11, atol=0)
    torch.testing.assert_close(grad_f, grad_s, rtol=1e-9, atol=1e-13)
    if n_layers == 2 and api == "hooked":  # a late block from the cached residual stream
        late = ModelProblem(model, tokens, params=r"^blocks\.1\.")
        with autograd_only():
            late_slow = ModelProblem(model, tokens, params=r"^blocks\.1\.")
        assert late.start_layer == 1 and late.plain
        v = late.w_star * 1.02
        with late.bind(v.clone()):
            a = [t.clone() for t in late.value_and_grad(v, idx)]
        with late_slow.bind(v.clone()):
            b = late_slow.value_and_grad(v, idx)
        torch.testing.assert_close(a[0], b[0], rtol=1e-11, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=1e-9, atol=1e-13)


@pytest.mark.filterwarnings("ignore::tl_degeneracy.engine.degeneracy.config.SGLDWarning")
@pytest.mark.parametrize("batched", [True, False])
def test_progress_bar_counts_every_step_and_leaves_the_result_unchanged(
    batched, capsys, monkeypatch
):
    """`progress=True` draws one tqdm bar over all chains' steps (diverged chains included)
    and changes nothing else."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    problem = linear_regression_problem(3, n=500)
    problem.batched = batched
    if not batched:  # the same loss, one chain at a time
        inner = problem.loss_fn
        problem.loss_fn = lambda w, idx: inner(w[None], idx[None])[0]
    cfg = SGLDConfig(step_size=1e-4, gamma=1.0, n_chains=2, n_steps=30, n_burnin=5, batch_size=50)
    quiet = estimate_llc(problem, cfg)
    loud = estimate_llc(problem, cfg, progress=True)
    err = capsys.readouterr().err
    assert "SGLD ε=0.0001" in err and "60/60" in err
    assert torch.equal(quiet.loss_traces, loud.loss_traces)


def _steps_of(problem, cfg, noise_seed=None):
    """Traces of `_sample` from w*, with the noise drawn from its own streams (as for weights
    on a GPU) when `noise_seed` is given."""
    from tl_degeneracy.engine.degeneracy.sgld import ChainState, _sample

    c = cfg.n_chains
    gens = [torch.Generator().manual_seed(10 + i) for i in range(c)]
    noise = (
        None
        if noise_seed is None
        else [torch.Generator().manual_seed(noise_seed + i) for i in range(c)]
    )
    w0 = [problem.w_star.detach().clone() for _ in range(c)]
    state = ChainState(w0, gens, torch.ones(c, dtype=torch.bool), noise)
    return _sample(problem, cfg, state, None, cfg.n_steps, False, False)


def test_minibatches_drawn_in_blocks_are_those_drawn_step_by_step(
    monkeypatch, api, tiny, tokens_for
):
    """With the noise in its own stream (weights on a GPU) the minibatch indices of 16 steps
    are drawn and moved in one go: the same traces, bit for bit, as one draw per step, across
    block boundaries and when a run is continued."""
    from tl_degeneracy.engine.degeneracy import sgld

    model = tiny(api)
    problem = ModelProblem(model, tokens_for(model, 64))
    cfg = SGLDConfig(step_size=1e-4, n_chains=2, n_steps=37, n_burnin=5, batch_size=8)
    blocks = _steps_of(problem, cfg, noise_seed=99)
    longer = sgld.continue_llc(problem, blocks, 20, warn=False)
    monkeypatch.setattr(sgld, "MINIBATCH_BLOCK", 1)
    steps = _steps_of(problem, cfg, noise_seed=99)
    assert torch.equal(blocks.loss_traces, steps.loss_traces)
    assert torch.equal(
        longer.loss_traces, sgld.continue_llc(problem, steps, 20, warn=False).loss_traces
    )
    assert not torch.equal(steps.loss_traces, _steps_of(problem, cfg).loss_traces)  # own noise


def test_sgld_steps_wait_on_the_device_only_at_the_divergence_checks(api, tiny, tokens_for):
    """A step of the written-out forward (a masked parameter, one query position) reads no
    value into Python and makes no tensor from host data; a GPU waits only at the divergence
    check every 16 steps (two reads per chain)."""
    from tl_degeneracy.engine.synchronisation import count_synchronisations

    model = tiny(api)
    name, w_q = next((n, p) for n, p in state_dict_parameters(model).items() if ".attn." in n)
    mask = torch.rand(w_q.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    problem = ModelProblem(model, tokens_for(model, 64), params={name: mask})
    assert problem.plain

    def waits(n_steps: int) -> int:
        cfg = SGLDConfig(step_size=1e-5, n_chains=2, n_steps=n_steps, n_burnin=5, batch_size=8)
        return count_synchronisations(lambda: estimate_llc(problem, cfg, warn=False), "cpu")

    assert waits(64) - waits(32) == 2 * 2 * 2  # two more checks, two reads each, two chains


def _batched_steps(problem, cfg, noise_seed=None, alive=None):
    """Traces of `_sample` from w* for a batched problem, with the noise drawn from its own
    stream (as for weights on a GPU) when `noise_seed` is given."""
    from tl_degeneracy.engine.degeneracy.sgld import ChainState, _sample

    c = cfg.n_chains
    noise = None if noise_seed is None else [torch.Generator().manual_seed(noise_seed)]
    alive = torch.ones(c, dtype=torch.bool) if alive is None else alive
    w0 = [problem.w_star.detach()[None].repeat(c, 1)]
    state = ChainState(w0, [torch.Generator().manual_seed(10)], alive, noise)
    return _sample(problem, cfg, state, None, cfg.n_steps, False, False)


def test_batched_minibatches_drawn_in_blocks_are_those_drawn_step_by_step(monkeypatch):
    """All chains at once: 16 steps' minibatches drawn together when the noise has its own
    stream give the step-by-step traces bit for bit, across block boundaries and when a run is
    continued; a chain stopped before the run stays stopped either way."""
    from tl_degeneracy.engine.degeneracy import sgld

    problem = deep_linear_problem([4, 3, 2], r=1, n=300)
    cfg = SGLDConfig(step_size=1e-3, gamma=1.0, n_chains=3, n_steps=37, n_burnin=5, batch_size=20)
    stopped = torch.tensor([True, False, True])
    blocks = _batched_steps(problem, cfg, noise_seed=99, alive=stopped)
    longer = sgld.continue_llc(problem, blocks, 20, warn=False)
    monkeypatch.setattr(sgld, "MINIBATCH_BLOCK", 1)
    steps = _batched_steps(problem, cfg, noise_seed=99, alive=stopped)
    same = dict(rtol=0, atol=0, equal_nan=True)  # bit for bit; the stopped chain's are NaN
    torch.testing.assert_close(blocks.loss_traces, steps.loss_traces, **same)
    continued = sgld.continue_llc(problem, steps, 20, warn=False)
    torch.testing.assert_close(longer.loss_traces, continued.loss_traces, **same)
    assert bool(longer.loss_traces[1].isnan().all()) and not bool(
        longer.loss_traces[0].isnan().any()
    )


@pytest.mark.parametrize("noise_seed", [None, 99])
def test_batched_sgld_steps_read_nothing_from_the_device(noise_seed):
    """All chains at once, with a chain stopped before the run (so masked from the first
    step, as every chain is off the CPU), with or without the noise in its own stream and with
    or without another chain diverging: the reads into Python (each a GPU wait) do not grow
    with the number of steps."""
    from tl_degeneracy.engine.synchronisation import count_synchronisations

    problem = deep_linear_problem([4, 3, 2], r=1, n=300)

    def waits(n_steps: int, step_size: float) -> int:
        cfg = SGLDConfig(
            step_size=step_size, gamma=1.0, n_chains=3, n_steps=n_steps, n_burnin=5, batch_size=20
        )
        dead = torch.tensor([True, True, False])  # one chain stopped before: always masked
        return count_synchronisations(lambda: _batched_steps(problem, cfg, noise_seed, dead), "cpu")

    assert waits(64, 1e-3) == waits(32, 1e-3)
    assert waits(64, 2.0) == waits(32, 2.0)  # the live chain diverges too


def test_a_diverged_chain_of_a_batched_run_stays_at_w_star():
    """Stopping a chain by a mask (no read per step) leaves it at w*, where a continued run
    starts it, and cuts its trace at the step it diverged; the other chains go on."""
    problem = linear_regression_problem(5, n=1000)
    cfg = SGLDConfig(step_size=0.5, gamma=1.0, n_chains=3, n_steps=30, n_burnin=5, batch_size=10**9)
    res = estimate_llc(problem, cfg, warn=False)
    assert bool(res.diverged.all())
    (w,) = res.state.w
    assert torch.equal(w, problem.w_star[None].expand_as(w))
    first_nan = res.loss_traces.isnan().float().argmax(1)
    assert bool((first_nan > 0).all()) and bool(res.loss_traces[:, -1].isnan().all())
    assert torch.isfinite(res.loss_traces[torch.arange(3), first_nan - 1]).all()
