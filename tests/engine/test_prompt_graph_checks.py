"""Checking a prompt graph: interventions (mean, zero, value) against analytic effects and true
feature patching, first-order agreement with the attributions, and the side-by-side with
attribution patching (per-site sums equal TransformerLens's value)."""

from __future__ import annotations

import functools

import pytest
import torch
from support import random_tokens, tiny_model

from tl_degeneracy.engine.attribution import feature_patching_effects
from tl_degeneracy.engine.bases import Truncation
from tl_degeneracy.engine.compat import hooked_state_dict
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.prompt_graph import NodeRef, Target, prompt_graph
from tl_degeneracy.engine.prompt_graph.compare import compare_with_patching
from tl_degeneracy.engine.prompt_graph.interventions import (
    intervene,
    intervene_many,
    rank_by_effect,
)
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import capture_sites

GOOD, BAD = 3, 4
LAST = "blocks.1.hook_resid_post"


@functools.cache
def fitted(api: str, kind: str = "mlp", truncate: bool = False):
    model = tiny_model(api, kind, n_layers=2)
    hooks = [f"blocks.{b}.hook_resid_{s}" for b in range(2) for s in ("pre", "mid")]
    sites = (*(Site(h) for h in hooks), Site(LAST), Site("logits", "last"))
    trunc = Truncation(1e-15, 0.05) if truncate else Truncation()
    result = fit_basis(
        model, random_tokens(model, 100), LIBConfig(sites, truncation=trunc, progress=False)
    )
    return model, result


def test_modes_at_the_last_site_are_analytic(api):
    """Before a linear unembedding (no final norm) setting feature j from f̂_j to v moves the
    logit difference by (v − f̂_j) C⁺_j · (W_U[:, good] − W_U[:, bad])."""
    model, result = fitted(api)
    tokens = random_tokens(model, 1, seed=2)
    basis = result[LAST]
    (act,) = capture_sites(model, tokens, [Site(LAST)])
    feats = basis.features(act[0])  # [pos, k]
    w_u = hooked_state_dict(model)["unembed.W_U"].to(torch.float64)
    read = w_u[:, GOOD] - w_u[:, BAD]
    target = Target.logit_difference(GOOD, BAD)
    pos, j = 3, 2  # the target reads the last position
    zero_value = float(-(basis.mean @ basis.C)[j])
    for mode, v in (("mean", 0.0), ("zero", zero_value), ("value", 1.7)):
        values = [v] if mode == "value" else None
        res = intervene(model, result, tokens, target, [(LAST, pos, j)], mode, values)
        want = (v - float(feats[pos, j])) * float(basis.C_pinv[j] @ read)
        assert res.delta == pytest.approx(want, abs=1e-10), mode
    # a node at another position does not reach the last position's logits at the last site
    assert intervene(model, result, tokens, target, [(LAST, 1, j)]).delta == pytest.approx(
        0.0, abs=1e-12
    )


def test_value_intervention_is_feature_patching(api):
    """Setting a corrupted prompt's feature to its clean value is true feature patching."""
    model, result = fitted(api)
    clean, corrupted = random_tokens(model, 1, seed=5), random_tokens(model, 1, seed=6)
    target = Target.logit_difference(GOOD, BAD)
    site = "blocks.0.hook_resid_mid"
    basis = result[site]
    (act,) = capture_sites(model, clean, [Site(site)])
    clean_feats = basis.features(act[0])
    pos, feats = 2, [0, 3, 5]
    groups = [[(site, pos, j)] for j in feats]
    values = [[float(clean_feats[pos, j])] for j in feats]
    _, after = intervene_many(model, result, corrupted, target, groups, "value", values)
    with torch.no_grad():
        base = float(target(model(corrupted))[0])
    at_pos = Site(site, (pos,))
    from dataclasses import replace

    patched = feature_patching_effects(
        model, replace(basis, site=at_pos), clean, corrupted, target.metric(), [[j] for j in feats]
    )
    assert torch.allclose(after - base, patched, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "ln"])
def test_small_interventions_follow_the_attributions(api, kind):
    """Scaling a feature by (1 − ε) moves the target by −ε · attribution to first order."""
    model, result = fitted(api, kind, truncate=True)
    tokens = random_tokens(model, 1, seed=7)
    target = Target.logit_difference(GOOD, BAD)
    graph = prompt_graph(model, result, tokens, target, freeze_final_norm=False)
    nodes = graph.top_nodes(6, by="attribution", kept=False)
    eps = 1e-6
    c = graph.candidates
    values = [[(1 - eps) * float(c.activation[graph.node_index(n)])] for n in nodes]
    before, after = intervene_many(model, result, tokens, target, [[n] for n in nodes], "value",
                                   values)  # fmt: skip
    for n, a in zip(nodes, (after - before).tolist()):
        attr = float(c.attribution[graph.node_index(n)])
        assert a / eps == pytest.approx(-attr, rel=1e-4, abs=1e-7), n


def test_rank_by_effect_measures_each_node(api):
    model, result = fitted(api)
    tokens = random_tokens(model, 1, seed=8)
    graph = prompt_graph(model, result, tokens, Target.logit_difference(GOOD, BAD))
    effects = rank_by_effect(model, graph)
    n_features = int((graph.kept_nodes & (graph.candidates.kind == 1)).sum())
    assert len(effects.nodes) == n_features > 0
    assert torch.all(effects.effect.abs()[:-1] >= effects.effect.abs()[1:])
    for node, e in list(zip(effects.nodes, effects.effect.tolist()))[:3]:
        alone = intervene(model, result, tokens, Target.logit_difference(GOOD, BAD), [node])
        assert e == pytest.approx(alone.delta, abs=1e-12)
    assert effects.rows()[0]["effect"] == pytest.approx(float(effects.effect[0]))


def test_bad_interventions_say_what_is_wrong(api):
    model, result = fitted(api)
    tokens = random_tokens(model, 1, seed=8)
    target = Target.logit(GOOD)
    with pytest.raises(KeyError, match="no basis"):
        intervene(model, result, tokens, target, [("blocks.5.hook_resid_pre", 0, 0)])
    with pytest.raises(IndexError, match="features"):
        intervene(model, result, tokens, target, [(LAST, 0, 10_000)])
    with pytest.raises(ValueError, match="values"):
        intervene(model, result, tokens, target, [(LAST, 0, 0)], mode="value")
    with pytest.raises(ValueError, match="feature index"):
        intervene(model, result, tokens, target, [NodeRef(LAST, 0, -1)])
    n_pos = tokens.shape[1]
    for position in (n_pos, -n_pos - 1, 99):  # would wrap round to another position
        with pytest.raises(IndexError, match=f"outside the prompt's {n_pos} tokens"):
            intervene(model, result, tokens, target, [(LAST, position, 0)])
    last = intervene(model, result, tokens, target, [(LAST, -1, 0)])  # from the end: allowed
    assert last.delta == pytest.approx(
        intervene(model, result, tokens, target, [(LAST, n_pos - 1, 0)]).delta, abs=1e-12
    )


@pytest.mark.parametrize("truncate", [False, True])
def test_site_sums_equal_transformer_lens_attribution_patching(api, truncate):
    model, result = fitted(api, "mlp", truncate)
    clean, corrupted = random_tokens(model, 1, seed=5), random_tokens(model, 1, seed=6)
    comparison = compare_with_patching(
        model, result, clean, corrupted, Target.logit_difference(GOOD, BAD), top=4
    )
    assert len(comparison.sites) == 5
    for row in comparison.sites:
        tl = row["TransformerLens"]
        assert row["nodes (attribution patching)"] == pytest.approx(tl, abs=1e-10), row["site"]
        if truncate:
            assert abs(row["rest (attribution patching)"]) > 0
    assert comparison.max_site_discrepancy() < 1e-10
    # after the last site only the linear unembedding: first order is exact per node
    last = [r for r in comparison.nodes if r["site"] == LAST]
    assert 0 < len(last) <= 4  # nodes whose attribution patching is exactly 0 are left out
    for r in last:
        assert r["attribution patching"] == pytest.approx(r["patching"], abs=1e-10)
    assert -1.0 <= comparison.correlation() <= 1.0
    assert "TransformerLens" in comparison.sites_table()


def test_a_basis_with_mlp_and_attention_sites_and_how_a_graph_is_asked_for(api):
    """A basis with MLP and attention sites (as `residual_sites(model, mlp=...)` gives) makes a
    graph of its residual sites (composite sites left out); sites by short form; a prompt as
    a list; text, a batch, a bad `sign` and a custom metric without its function are refused
    by name."""
    from tl_degeneracy.engine.sites import SiteError

    model = tiny_model(api, "mlp", n_layers=2)
    sites = (
        Site("blocks.0.hook_resid_pre"),
        Site("blocks.0.hook_resid_mid"),
        Site("blocks.0.mlp.hook_post"),
        Site("blocks.1.hook_resid_pre"),
        Site("blocks.1.attn.hook_z"),
        Site("blocks.1.hook_resid_post"),
        Site("logits", "last"),
    )
    result = fit_basis(model, random_tokens(model, 100), LIBConfig(sites, progress=False))
    tokens = random_tokens(model, 1, seed=8)
    target = Target.logit_difference(GOOD, BAD)
    graph = prompt_graph(model, result, tokens, target)
    assert graph.sites == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_mid",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_post",
    ]
    short = prompt_graph(model, result, tokens.tolist(), target, sites=(("resid_post", 1),))
    assert short.sites == ["blocks.1.hook_resid_post"]
    with pytest.raises(SiteError, match="leave `sites` out"):
        prompt_graph(model, result, tokens, target, sites=("blocks.0.mlp.hook_post",))
    with pytest.raises(TypeError, match="not text"):
        prompt_graph(model, result, "a prompt", target)
    with pytest.raises(ValueError, match=r"\[1, pos\]"):
        prompt_graph(model, result, random_tokens(model, 2), target)
    with pytest.raises(ValueError, match="sign must be"):
        graph.top_nodes(3, sign="bogus")
    with pytest.raises(ValueError, match="positions is empty"):
        prompt_graph(model, result, tokens, target, positions=())
    with pytest.raises(IndexError, match="outside this model's vocabulary"):
        prompt_graph(model, result, tokens, Target.logit_difference(GOOD, model.cfg.d_vocab))
    with pytest.raises(IndexError, match="outside the prompt's"):
        prompt_graph(model, result, tokens, Target.logit(GOOD, position=tokens.shape[1]))
    metric = Target.from_metric(lambda logits: logits[:, -1, GOOD] - logits[:, -1, BAD], "diff")
    custom = prompt_graph(model, result, tokens, metric)
    with pytest.raises(ValueError, match="pass it again as `target`"):
        rank_by_effect(model, custom)
    by_metric = rank_by_effect(model, custom, target=metric)
    by_logits = rank_by_effect(model, graph)
    assert by_metric.effect.tolist() == pytest.approx(by_logits.effect.tolist(), abs=1e-12)


@pytest.mark.parametrize("positions", ["all", (1, 3), "last"])
def test_nodes_are_patched_side_by_side_as_each_alone_in_few_forwards(api, positions):
    """A site's top nodes are patched side by side in one forward (each its feature at its
    position), sharing the sites' activations, the unpatched run and TransformerLens's cache:
    each equals patching that feature at that position alone (`feature_patching_effects`),
    in two forwards per site plus a fixed ten (20 for these five sites; there were 55). At
    positions other than those the basis was fitted at, too (the nodes were patched at the
    fit's positions: wrong values, or an IndexError)."""
    from dataclasses import replace

    model, result = fitted(api, "mlp", False)
    clean, corrupted = random_tokens(model, 1, seed=5), random_tokens(model, 1, seed=6)
    target = Target.logit_difference(GOOD, BAD)
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        comparison = compare_with_patching(
            model, result, clean, corrupted, target, positions=positions, top=4
        )
    finally:
        handle.remove()
    n_sites = len(comparison.sites)
    assert len(forwards) <= 2 * n_sites + 10, len(forwards)
    assert len(comparison.nodes) == 4 * n_sites
    for row in comparison.nodes:
        basis = result[row["site"]]
        alone = replace(basis, site=Site(basis.site.hook, (row["position"],)))
        effect = feature_patching_effects(
            model, alone, clean, corrupted, target.metric(), [[row["feature"]]]
        )
        assert row["patching"] == pytest.approx(float(effect[0]), abs=1e-12), row
