"""The engine on any device and dtype: a model on CUDA gives the CPU's numbers (float64), its
statistics can live on the CPU, float32/bfloat16 models fit, results load onto any device.

Every test runs on the CPU in the fast suite (checking the test itself) and on CUDA where it is
available (marker `gpu`; `pytest -m gpu`)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch
from support import DEVICES, random_tokens, tiny_model

from tl_degeneracy.engine import statistics
from tl_degeneracy.engine.ablation import last_position_accuracy, node_ablation_curve
from tl_degeneracy.engine.attach import attach
from tl_degeneracy.engine.attribution import compare_attribution
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import available_apis, move_model
from tl_degeneracy.engine.edge_ablation import edges_required
from tl_degeneracy.engine.edges import EdgeConfig, interaction_graph
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.jacobians import JacobianConfig
from tl_degeneracy.engine.sites import Site, validate_sites
from tl_degeneracy.engine.statistics import GramAccumulator
from tl_degeneracy.engine.synchronisation import count_synchronisations

API = available_apis()[0]
PLAIN_SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid", "last"),
    Site("blocks.0.hook_resid_post", "last"),
    Site("logits", "last"),
)
LN_SITES = (
    Site("blocks.0.hook_resid_pre", "1:"),
    Site("blocks.0.hook_resid_mid", "1:"),
    Site("blocks.0.mlp.hook_post", "1:"),
    Site("blocks.1.hook_resid_pre", "1:"),
    Site("blocks.1.hook_resid_post", "1:"),
)


def _pair(kind: str, device: str, dtype=torch.float64, **overrides):
    """The same random model on the CPU (float64) and on `device` (in `dtype`)."""
    cpu = tiny_model(API, kind, seed=3, **overrides)
    moved = move_model(tiny_model(API, kind, seed=3, **overrides), device, dtype)
    return cpu, moved


def _same_bases(a: BasisResult, b: BasisResult, rtol=1e-9, atol=1e-11):
    for name, x in a.bases.items():
        y = b.bases[name]
        assert y.C.device.type == "cpu"  # results are device-independent
        torch.testing.assert_close(x.importance, y.importance, rtol=rtol, atol=atol)
        signs = torch.sign((x.C * y.C).sum(0))
        torch.testing.assert_close(x.C, y.C * signs, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_plain_model_fit_edges_ablation_on_device(device):
    """Closed forms (attention, ReLU MLP, unembedding), edges, node and edge ablation."""
    cpu, dev = _pair("mlp", device)
    toks = random_tokens(cpu, 40, seed=1)
    config = LIBConfig(PLAIN_SITES, progress=False)
    ref, got = fit_basis(cpu, toks, config), fit_basis(dev, toks, config)
    _same_bases(ref, got)
    g_ref = interaction_graph(cpu, toks, ref, progress=False)
    g_dev = interaction_graph(dev, toks, ref, progress=False)
    for name, se in g_ref.sections.items():
        torch.testing.assert_close(g_dev[name].edges.cpu(), se.edges, rtol=1e-9, atol=1e-12)
    metric = last_position_accuracy(lambda t: t[:, 1])
    site = PLAIN_SITES[1].name
    c_ref = node_ablation_curve(cpu, ref, site, toks, metric, ks=[0, 2, 5])
    c_dev = node_ablation_curve(dev, ref, site, toks, metric, ks=[0, 2, 5])
    assert c_ref.scores == pytest.approx(c_dev.scores, abs=1e-12)
    a, b = ref[PLAIN_SITES[1].name], ref[PLAIN_SITES[2].name]
    se = g_ref.sections[f"{a.site.name}->{b.site.name}"]
    r_ref = edges_required(cpu, toks, se, a, b, metric, tolerance=0.05)
    r_dev = edges_required(dev, toks, se, a, b, metric, tolerance=0.05)
    assert r_ref.edges_required == r_dev.edges_required


@pytest.mark.parametrize("device", DEVICES)
def test_layernorm_model_with_mlp_site_and_bos_left_out(device):
    """Block-local and generic sections, a composite MLP site, sites without position 0;
    statistics on the model's device or kept on the CPU."""
    cpu, dev = _pair("ln", device, n_layers=2, n_ctx=6)
    toks = random_tokens(cpu, 24, seed=2)
    config = LIBConfig(LN_SITES, final_basis="pca", batch_size=8, progress=False)
    ref = fit_basis(cpu, toks, config)
    _same_bases(ref, fit_basis(dev, toks, config))
    _same_bases(ref, fit_basis(dev, toks, LIBConfig(**{**config.__dict__, "stats_device": "cpu"})))
    edges = EdgeConfig()
    g_ref = interaction_graph(cpu, toks, ref, edges, batch_size=8, progress=False, top_outputs=4)
    g_dev = interaction_graph(dev, toks, ref, edges, batch_size=8, progress=False, top_outputs=4)
    for name, se in g_ref.sections.items():
        torch.testing.assert_close(g_dev[name].edges.cpu(), se.edges, rtol=1e-8, atol=1e-12)
    with torch.no_grad(), attach(dev, ref):
        attached = dev(toks.to(device))
    torch.testing.assert_close(attached, dev(toks.to(device)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models_fit(device, dtype):
    """float32 and bfloat16 models: statistics in float64, finite bases close to float64's."""
    cpu, dev = _pair("ln", device, dtype=dtype, n_layers=2, n_ctx=6)
    toks = random_tokens(cpu, 24, seed=2)
    config = LIBConfig(LN_SITES, final_basis="pca", batch_size=8, progress=False)
    from tl_degeneracy.engine.bases import Truncation

    config = LIBConfig(**{**config.__dict__, "truncation": Truncation(1e-15, 1e-6)})
    got = fit_basis(dev, toks, config)
    ref = fit_basis(cpu, toks, config)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, b in got.bases.items():
        assert torch.isfinite(b.C).all() and b.C.dtype == torch.float64
        top = min(3, b.k, ref[name].k)
        torch.testing.assert_close(
            b.importance[:top], ref[name].importance[:top], rtol=tol * 10, atol=0
        )


@pytest.mark.parametrize("device", DEVICES)
def test_attribution_and_loading_onto_another_device(device, tmp_path):
    cpu, dev = _pair("mlp", device)
    toks = random_tokens(cpu, 30, seed=1)
    ref = fit_basis(cpu, toks, LIBConfig(PLAIN_SITES, progress=False))
    ref.save(tmp_path / "lib")
    loaded = BasisResult.load(tmp_path / "lib", dev)  # checked against the moved model
    clean, corrupted = random_tokens(cpu, 8, seed=5), random_tokens(cpu, 8, seed=6)

    def metric(logits, tokens):
        last = logits[:, -1].to(torch.float64)
        return last[:, 0] - last[:, 1]

    a = compare_attribution(cpu, ref, None, clean, corrupted, metric)
    b = compare_attribution(dev, loaded, None, clean, corrupted, metric)
    for name, sa in a.sites.items():
        torch.testing.assert_close(b[name].attribution, sa.attribution, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(b[name].patching, sa.patching, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_estimates_are_reproducible_on_device(device):
    """Rademacher sources drawn on the model's device: the same seed gives the same M'."""
    _, dev = _pair("ln", device, n_layers=2, n_ctx=6)
    toks = random_tokens(dev, 16, seed=2)
    jac = JacobianConfig(method="stochastic", n_sources=3, seed=1)
    config = LIBConfig(LN_SITES, final_basis="pca", jacobian=jac, batch_size=8, progress=False)
    a, b = fit_basis(dev, toks, config), fit_basis(dev, toks, config)
    for name, x in a.bases.items():
        assert torch.equal(x.importance, b.bases[name].importance)


def _reproducible_chains(problem, cfg, split: int, rtol: float, atol: float):
    """Finite traces, on the CPU; the same seed gives the same traces, and a run continued
    after `split` steps gives those of one run (to `rtol`, `atol`). Returns both runs."""
    from tl_degeneracy.engine.degeneracy import continue_llc, estimate_llc

    a, b = estimate_llc(problem, cfg, warn=False), estimate_llc(problem, cfg, warn=False)
    assert torch.isfinite(a.loss_traces).all() and a.loss_traces.device.type == "cpu"
    torch.testing.assert_close(a.loss_traces, b.loss_traces, rtol=rtol, atol=atol)
    short = estimate_llc(problem, replace(cfg, n_steps=split), warn=False)
    rest = cfg.n_steps - split
    longer = continue_llc(problem, short, rest, n_burnin=cfg.n_burnin, warn=False)
    torch.testing.assert_close(longer.loss_traces, a.loss_traces, rtol=rtol, atol=atol)
    return a, longer


@pytest.mark.parametrize("device", DEVICES)
def test_sgld_on_device(device):
    """Chains on the model's device (noise drawn there): finite, the same seed gives the same
    traces, and continuing a run equals one longer run (to rounding: CUDA's embedding
    backward adds in any order)."""
    from tl_degeneracy.engine.degeneracy import ModelProblem, SGLDConfig, estimate_llc

    _, dev = _pair("mlp", device)
    toks = random_tokens(dev, 64, seed=1).to(device)
    problem = ModelProblem(dev, toks)
    cfg = SGLDConfig(step_size=1e-5, n_chains=2, n_steps=20, n_burnin=5, batch_size=32)
    a, longer = _reproducible_chains(problem, cfg, 12, rtol=1e-9, atol=1e-12)
    assert longer.llc == pytest.approx(a.llc, rel=1e-7)
    scaled = replace(cfg, step_scales=((r"^blocks\.", 0.5),))
    assert torch.isfinite(estimate_llc(problem, scaled, warn=False).loss_traces).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batched_sgld_on_device(device):
    """All chains of a function's loss at once, on the device (data, weights, minibatch
    indices and noise there): finite, reproducible, continued runs equal one longer run, and
    a diverged chain is stopped by a mask, left at w*, without reading the device per step."""
    from tl_degeneracy.engine.degeneracy import SGLDConfig, estimate_llc
    from tl_degeneracy.engine.degeneracy.ground_truth import deep_linear_problem

    problem = deep_linear_problem([4, 3, 2], r=1, n=300, device=device)
    cfg = SGLDConfig(step_size=1e-3, gamma=1.0, n_chains=3, n_steps=40, n_burnin=5, batch_size=20)
    _reproducible_chains(problem, cfg, 23, rtol=1e-12, atol=1e-15)
    wild = estimate_llc(problem, replace(cfg, step_size=2.0), warn=False)
    (w,) = wild.state.w
    assert bool(wild.diverged.all()) and w.device == problem.w_star.device
    assert torch.equal(w, problem.w_star[None].expand_as(w))


COMPOSITE_SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.attn.hook_z"),
    Site("blocks.0.hook_resid_mid"),
    Site("blocks.0.mlp.hook_post"),
    Site("blocks.0.hook_resid_post"),
    Site("logits", "last"),
)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_and_mlp_sites_on_device(device):
    """A plain ReLU model with its heads and MLP neurons as sites: the closed forms into and
    out of the composite sites (`[W_O; I]`, `[W_out; I]`, the ReLU MLP into `[hidden,
    stream]`) are built on the device, and give the CPU's bases and edges."""
    cpu, dev = _pair("mlp", device)
    toks = random_tokens(cpu, 40, seed=1)
    config = LIBConfig(COMPOSITE_SITES, progress=False)
    ref, got = fit_basis(cpu, toks, config), fit_basis(dev, toks, config)
    methods = got.metadata["jacobian_methods"]  # by the section's input site
    assert methods["blocks.0.hook_resid_mid"] == "closed_form:relu_mlp"  # into [hidden, stream]
    out_of_composites = {methods["blocks.0.mlp.hook_post"], methods["blocks.0.attn.hook_z"]}
    assert out_of_composites == {"closed_form:affine"}
    _same_bases(ref, got)
    g_ref = interaction_graph(cpu, toks, ref, progress=False)
    g_dev = interaction_graph(dev, toks, ref, progress=False)
    for name, se in g_ref.sections.items():
        torch.testing.assert_close(g_dev[name].edges.cpu(), se.edges, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_prompt_graphs_on_device(device):
    """A prompt graph, its interventions, the features over a corpus and the comparison with
    attribution patching of a model on the device (prompts given on the CPU) give the CPU's
    numbers; everything they return is on the CPU."""
    from tl_degeneracy.engine.prompt_graph import (
        Target,
        compare_with_patching,
        intervene,
        prompt_graph,
    )
    from tl_degeneracy.engine.prompt_graph.details import corpus_features

    cpu, dev = _pair("mlp", device, n_layers=2)
    sites = (
        *(Site(f"blocks.{b}.hook_resid_{s}") for b in range(2) for s in ("pre", "mid")),
        Site("blocks.1.hook_resid_post"),
        Site("logits", "last"),
    )
    basis = fit_basis(cpu, random_tokens(cpu, 60, seed=1), LIBConfig(sites, progress=False))
    prompt, other = random_tokens(cpu, 1, seed=7), random_tokens(cpu, 1, seed=8)
    target = Target.logit_difference(3, 4)
    kw = dict(candidate_share=1.0, max_candidates=10**6)
    a, b = (
        prompt_graph(cpu, basis, prompt, target, **kw),
        prompt_graph(dev, basis, prompt, target, **kw),
    )
    assert b.candidates.weight.device.type == "cpu"
    assert b.value == pytest.approx(a.value, rel=1e-10)
    for x, y in zip(a.attributions, b.attributions):
        torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.candidates.weight, a.candidates.weight, rtol=1e-9, atol=1e-12)
    nodes = [("blocks.1.hook_resid_pre", 2, 0), ("blocks.0.hook_resid_mid", 1, 1)]
    for mode in ("mean", "zero"):
        ia, ib = (
            intervene(cpu, basis, prompt, target, nodes, mode),
            intervene(dev, basis, prompt, target, nodes, mode),
        )
        assert ib.after == pytest.approx(ia.after, rel=1e-10, abs=1e-12)
    wanted = {"blocks.1.hook_resid_pre": [0, 2]}
    corpus = random_tokens(cpu, 6, seed=9)
    fa, fb = (
        corpus_features(cpu, basis, corpus, wanted),
        corpus_features(dev, basis, corpus, wanted),
    )
    assert fb["blocks.1.hook_resid_pre"].device.type == "cpu"
    torch.testing.assert_close(fb["blocks.1.hook_resid_pre"], fa["blocks.1.hook_resid_pre"])
    ca = compare_with_patching(cpu, basis, prompt, other, target, top=3)
    cb = compare_with_patching(dev, basis, prompt, other, target, top=3)
    for ra, rb in zip(ca.sites + ca.nodes, cb.sites + cb.nodes):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("device", DEVICES)
def test_a_bridge_on_a_device_takes_tokens_on_the_cpu(device):
    """A TransformerBridge, unlike a HookedTransformer, runs on its inputs where they are;
    every entry point that takes tokens moves them to the model's device: fitting, attribution
    and patching, prompt graphs and the behavioural loss of the degeneracy measures."""
    from tl_degeneracy.engine.attribution import (
        feature_patching_effects,
        site_gradients,
        site_patching_effect,
        tl_site_attribution,
    )
    from tl_degeneracy.engine.degeneracy import ModelProblem
    from tl_degeneracy.engine.prompt_graph import Target, prompt_graph

    cpu = tiny_model("bridge", "mlp", seed=3)
    dev = move_model(tiny_model("bridge", "mlp", seed=3), device)
    toks = random_tokens(cpu, 30, seed=1)  # on the CPU
    ref = fit_basis(cpu, toks, LIBConfig(PLAIN_SITES, progress=False))
    _same_bases(ref, fit_basis(dev, toks, LIBConfig(PLAIN_SITES, progress=False)))
    clean, corrupted = random_tokens(cpu, 6, seed=5), random_tokens(cpu, 6, seed=6)

    def metric(logits, tokens):
        return logits[:, -1, 0].to(torch.float64) - logits[:, -1, 1].to(torch.float64)

    site, basis = PLAIN_SITES[1], ref[PLAIN_SITES[1].name]
    for fn, args in (
        (feature_patching_effects, (basis, clean, corrupted, metric)),
        (site_patching_effect, (site, clean, corrupted, metric)),
        (tl_site_attribution, (site, clean, corrupted, metric)),
    ):
        expected, got = fn(cpu, *args), fn(dev, *args)
        torch.testing.assert_close(torch.as_tensor(got).cpu(), torch.as_tensor(expected))
    _, grads, value = site_gradients(dev, [site], clean, metric)
    assert value == pytest.approx(site_gradients(cpu, [site], clean, metric)[2], rel=1e-10)
    graph = prompt_graph(dev, ref, clean[:1], Target.logit(0))
    assert graph.value == pytest.approx(prompt_graph(cpu, ref, clean[:1], Target.logit(0)).value)
    problem = ModelProblem(dev, toks)
    assert problem.tokens.device == next(dev.parameters()).device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", available_apis())
def test_report_views_and_composite_ablation_on_device(device, api):
    """What the report reads from a model on the device, with bases and tokens on the CPU:
    the dominant-direction diagnostic traced to its tokens (from a PCA fit and from the
    statistics), feature examples and logit effects; node ablation and `ablate_nodes` at
    attention and MLP sites."""
    from tl_degeneracy.engine.ablation import next_token_loss
    from tl_degeneracy.engine.attach import ablate_nodes
    from tl_degeneracy.engine.diagnostics import dominant_directions
    from tl_degeneracy.engine.statistics import collect_statistics
    from tl_degeneracy.experiments.report_views import all_feature_examples, feature_logit_effects

    sites = COMPOSITE_SITES[:-1]
    cpu = tiny_model(api, "ln", seed=3, n_layers=1, n_ctx=6)
    dev = move_model(tiny_model(api, "ln", seed=3, n_layers=1, n_ctx=6), device)
    toks = random_tokens(cpu, 16, seed=1)
    lib = fit_basis(cpu, toks, LIBConfig(sites, final_basis="pca", progress=False))
    pca = fit_basis(cpu, toks, LIBConfig(sites, kind="pca", progress=False))
    stats = collect_statistics(dev, sites, toks, progress=False)
    for source in (pca, stats):
        a = dominant_directions(source, cpu, toks, str, threshold=0.0)
        b = dominant_directions(source, dev, toks, str, threshold=0.0)
        assert [d.hits[0].projection for d in b.directions] == pytest.approx(
            [d.hits[0].projection for d in a.directions], rel=1e-9
        )
    ex_a = all_feature_examples(cpu, {"lib": lib}, toks, str)["lib"]
    ex_b = all_feature_examples(dev, {"lib": lib}, toks, str)["lib"]
    for name, e in ex_a.items():
        torch.testing.assert_close(ex_b[name].values, e.values)
    names = [s.name for s in sites]
    effects = feature_logit_effects(dev, lib, str, names)
    for name, e in feature_logit_effects(cpu, lib, str, names).items():
        assert [[t for t, _ in row] for row in effects[name].promoted] == [
            [t for t, _ in row] for row in e.promoted
        ]
    for site in (sites[1], sites[3]):  # the heads, the MLP neurons
        a = node_ablation_curve(cpu, lib, site.name, toks, next_token_loss, ks=[0, 3])
        b = node_ablation_curve(dev, lib, site.name, toks, next_token_loss, ks=[0, 3])
        assert b.scores == pytest.approx(a.scores, rel=1e-9)
        with torch.no_grad(), ablate_nodes(cpu, lib, site.name, k=3):
            expected = cpu(toks)
        with torch.no_grad(), ablate_nodes(dev, lib, site.name, k=3):
            got = dev(toks.to(device))
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_sources_of_degeneracy_on_device(device):
    """The three sources (activation and gradient spectra, neuron and head groups) of a model
    on the device, tokens on the CPU: the CPU's spectra, groups and bound, results on the CPU."""
    from tl_degeneracy.engine.degeneracy import SourcesConfig, measure_sources

    cpu, dev = _pair("mlp", device)
    toks = random_tokens(cpu, 64, seed=2)
    a = measure_sources(cpu, toks, SourcesConfig(batch_size=32))
    b = measure_sources(dev, toks, SourcesConfig(batch_size=32))
    for x, y in zip(a.maps, b.maps):
        for got, expected in (
            (y.gram_spectrum, x.gram_spectrum),
            (y.grad_spectrum, x.grad_spectrum),
        ):
            assert got.device.type == "cpu"
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    for name, groups in a.neurons.items():
        assert torch.equal(b.neurons[name].labels, groups.labels)
        assert torch.equal(b.neurons[name].dead, groups.dead)
    assert b.upper_bound() == a.upper_bound()


@pytest.mark.parametrize("device", DEVICES)
def test_gram_batch_synchronises_once_more_than_the_forward(device):
    """A batch of the Gram pass (float32 model, float64 sums on the device, residual, MLP and
    last-position sites) waits on the device once more than the model's own forward: for the
    NaN/Inf check, before its products, which then overlap the next batch's forward."""
    _, model = _pair("ln", device, torch.float32, n_layers=2, n_ctx=6)
    sites = validate_sites(model, [*LN_SITES[:-1], ("blocks.1.hook_resid_post", "last")])
    toks = random_tokens(model, 8).to(device)
    acc = GramAccumulator(model, sites, device)
    acc.update(0, toks)  # creates the sums
    batched = partial(statistics.add_to_statistics, batched=True)  # as on a GPU
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(statistics, "add_to_statistics", batched)
        forward = count_synchronisations(lambda: model(toks), device)
        gram = count_synchronisations(lambda: acc.update(1, toks), device)
    assert 1 <= gram <= forward + 1, (gram, forward)
