"""Attribution patching in a basis (docs/attribution.md): sum rule, truncation gap, agreement with
TransformerLens's own attribution tooling, and true per-feature patching."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from support import random_tokens, tiny_model

from tl_degeneracy.engine.attribution import (
    AttributionComparison,
    AttributionGapWarning,
    compare_attribution,
    feature_patching_effects,
    format_correlation_table,
    site_gradients,
    site_patching_effect,
    spearman,
    tl_site_attribution,
)
from tl_degeneracy.engine.attribution import gradients as attribution
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sites import Site

SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid"),
    Site("blocks.0.hook_resid_post", "last"),
    Site("logits", "last"),
)
HOSTILE = "<script>alert(1)</script>"


def logit_difference(logits, tokens):
    """Per-sequence logit of token 3 minus token 4 at the last position."""
    return logits[:, -1, 3] - logits[:, -1, 4]


@functools.cache
def _fitted(api, kind, n_layers):
    model = tiny_model(api, n_layers=n_layers)
    result = fit_basis(
        model, random_tokens(model, 200), LIBConfig(SITES, kind=kind, progress=False)
    )
    return model, result


def setting(api, tiny, tokens_for, kind="lib", n_layers=1):
    """A small float64 model, its fitted bases (cached per module: nothing here mutates them)
    and 12 clean/corrupted pairs."""
    model, result = _fitted(api, kind, n_layers)
    clean, corrupted = tokens_for(model, 12, seed=5), tokens_for(model, 12, seed=6)
    return model, result, clean, corrupted


@pytest.mark.parametrize("kind", ["lib", "pca", "neuron"])
def test_sum_rule_untruncated(api, tiny, tokens_for, kind):
    model, result, clean, corrupted = setting(api, tiny, tokens_for, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttributionGapWarning)
        comparison = compare_attribution(model, result, None, clean, corrupted, logit_difference)
    assert list(comparison.sites) == [s.name for s in SITES[:-1]]
    for name, sa in comparison.sites.items():
        assert sa.k == sa.d == result[name].d, "the test needs untruncated bases"
        assert sa.relative_gap < 1e-6, (name, sa.gap)
        assert abs(sa.feature_sum - sa.site_attribution) <= 1e-6 * abs(sa.site_attribution)


def test_composite_sites_compare_like_for_like_with_transformer_lens(api):
    """At MLP and attention sites TransformerLens measures the component's hook only: ours over
    that hook equals its value, and the summary shows both beside the whole site's."""
    model = tiny_model(api, n_layers=2)
    sites = (
        Site("blocks.0.attn.hook_z"),
        Site("blocks.0.mlp.hook_post"),
        Site("blocks.1.hook_resid_pre"),
        Site("logits", "last"),
    )
    result = fit_basis(model, random_tokens(model, 200), LIBConfig(sites, progress=False))
    clean, corrupted = random_tokens(model, 12, seed=5), random_tokens(model, 12, seed=6)
    comparison = compare_attribution(model, result, None, clean, corrupted, logit_difference)
    for name in ("blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"):
        sa = comparison.sites[name]
        assert sa.tl_comparable == pytest.approx(sa.tl_site_attribution, rel=1e-6)
        assert abs(sa.site_attribution - sa.tl_comparable) > 1e-3 * abs(sa.site_attribution)
        row = sa.summary()
        assert row["ours over TransformerLens's hook"] == sa.tl_comparable
        assert row["relative difference to TransformerLens"] < 1e-6
    assert "ours over TransformerLens&#x27;s hook" in comparison._repr_html_()


def test_site_level_value_equals_transformer_lens(api, tiny, tokens_for):
    """Ours equals TransformerLens's gradient-cache value at every site, `hook_resid_mid` on the
    Bridge (an alias of the MLP input) included."""
    model, result, clean, corrupted = setting(api, tiny, tokens_for, n_layers=2)
    comparison = compare_attribution(model, result, None, clean, corrupted, logit_difference)
    for sa in comparison.sites.values():
        assert sa.tl_site_attribution is not None
        assert sa.tl_relative_difference < 1e-6, sa.site
    site = Site("blocks.1.hook_resid_mid", (0, 2))
    _, grads, _ = site_gradients(model, [site], corrupted, logit_difference)
    ours = compare_attribution(
        model,
        {site.name: dataclasses.replace(result[SITES[0]], site=site)},
        [site],
        clean,
        corrupted,
        logit_difference,
    )[site.name]
    tl = tl_site_attribution(model, site, clean, corrupted, logit_difference)
    assert grads[site.name].shape == (12, 2, model.cfg.d_model)
    assert ours.site_attribution == pytest.approx(tl, rel=1e-6)


def test_gradient_cache_fallback_and_frozen_models(api, tiny, tokens_for):
    """The forward-hook fallback (for TransformerLens releases without the gradient cache)
    gives TransformerLens's gradients; a frozen model still gets TransformerLens's value and
    stays frozen."""
    ap = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")
    model, result, clean, corrupted = setting(api, tiny, tokens_for)
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]

    def metric_fn(logits):
        return logit_difference(logits, corrupted).mean()

    ours = attribution._hook_gradient_cache(model, corrupted, metric_fn, names)
    theirs = ap.cache_activation_and_gradient(model, corrupted, metric_fn, names_filter=names)
    for name in names:
        torch.testing.assert_close(ours.gradients[name], theirs.gradients[name])
        torch.testing.assert_close(ours.activations[name], theirs.activations[name])
    site = SITES[1]
    expected = tl_site_attribution(model, site, clean, corrupted, logit_difference)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        frozen = tl_site_attribution(model, site, clean, corrupted, logit_difference)
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert frozen == pytest.approx(expected, rel=1e-12)


def test_batch_mean_matches_transformer_lens_attribution_patch(api, tiny, tokens_for):
    """TransformerLens's `attribution_patch` averages per-pair node scores; our site-level value
    at the same hook (its `mlp_out` node, summed over positions) is that average."""
    ap = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")
    model = tiny(api)
    clean, corrupted = tokens_for(model, 5, seed=5), tokens_for(model, 5, seed=6)
    result = ap.attribution_patch(
        model, clean, corrupted, lambda lg: (lg[:, -1, 3] - lg[:, -1, 4]).sum()
    )
    tl = sum(v for node, v in result.node_scores.items() if node.kind == "mlp_out")
    ours = tl_site_attribution(
        model, Site("blocks.0.hook_mlp_out"), clean, corrupted, logit_difference
    )
    assert ours == pytest.approx(tl, rel=1e-9)


def test_truncated_basis_reports_the_gap(api, tiny, tokens_for):
    model, result, clean, corrupted = setting(api, tiny, tokens_for, "pca")
    full = result[SITES[1]]
    k = 3
    cut = dataclasses.replace(
        full, C=full.C[:, :k], C_pinv=full.C_pinv[:k], importance=full.importance[:k]
    )
    with pytest.warns(AttributionGapWarning, match="keeps 3 of the"):
        sa = compare_attribution(
            model, {cut.site.name: cut}, [cut.site], clean, corrupted, logit_difference
        )[cut.site.name]
    assert sa.k == k < sa.d
    assert abs(sa.gap) > 1e-6 * abs(sa.site_attribution)
    assert sa.gap == pytest.approx(sa.site_attribution - float(sa.attribution.sum()))
    assert sa.relative_gap == pytest.approx(abs(sa.gap) / abs(sa.site_attribution))
    assert sa.summary()["gap"] == sa.gap


def test_a_large_gap_is_warned_with_its_cause(api, tiny, tokens_for):
    """A basis fitted on too little data spans only part of the site, and one cut to a few
    features drops the rest: either way the per-feature scores miss much of the site's
    attribution, and the warning says which happened and what to do."""
    model, _, clean, corrupted = setting(api, tiny, tokens_for, "pca")
    site = SITES[0]
    with pytest.warns(UserWarning, match="no feature kept"):  # downstream of one row
        narrow = fit_basis(
            model, tokens_for(model, 1, seed=9)[:, :4], LIBConfig(SITES, kind="pca", progress=False)
        )[site.name]
    assert narrow.k <= 3 < narrow.d
    with pytest.warns(AttributionGapWarning, match=f"spans only {narrow.k} of the site's"):
        sa = compare_attribution(
            model, {site.name: narrow}, [site], clean, corrupted, logit_difference
        )[site.name]
    assert sa.relative_gap > 0.1
    full = setting(api, tiny, tokens_for, "pca")[1][site.name]
    cut = dataclasses.replace(
        full, C=full.C[:, :1], C_pinv=full.C_pinv[:1], importance=full.importance[:1]
    )
    with pytest.warns(AttributionGapWarning, match=f"keeps 1 of the {full.d} directions"):
        compare_attribution(model, {site.name: cut}, [site], clean, corrupted, logit_difference)


def test_patching_all_features_at_once_is_full_site_patching(api, tiny, tokens_for):
    model, result, clean, corrupted = setting(api, tiny, tokens_for)
    for site in SITES[:-1]:
        basis = result[site]
        together = feature_patching_effects(
            model, basis, clean, corrupted, logit_difference, groups=[list(range(basis.k))]
        )
        full = site_patching_effect(model, site, clean, corrupted, logit_difference)
        assert float(together[0]) == pytest.approx(full, rel=1e-9, abs=1e-12)
    with torch.no_grad():
        total = float(
            (
                logit_difference(model(clean), clean)
                - logit_difference(model(corrupted), corrupted)
            ).mean()
        )
    # patching the whole residual stream at every position is the clean run
    assert site_patching_effect(model, SITES[1], clean, corrupted, logit_difference) == (
        pytest.approx(total, rel=1e-9)
    )


def test_patching_is_exact_where_the_rest_is_linear(api, tiny, tokens_for):
    """resid_post[-1] → logits is linear (no final norm): attribution = patching per feature,
    and chunking the repeated batch does not change the effects."""
    model, result, clean, corrupted = setting(api, tiny, tokens_for)
    site = SITES[2].name
    sa = compare_attribution(model, result, [site], clean, corrupted, logit_difference)[site]
    torch.testing.assert_close(sa.attribution, sa.patching, rtol=1e-9, atol=1e-12)
    assert sa.correlations()["attribution~patching"] == pytest.approx(1.0)
    chunked = feature_patching_effects(
        model, result[site], clean, corrupted, logit_difference, max_rows=12
    )
    torch.testing.assert_close(chunked, sa.patching, rtol=1e-12, atol=1e-14)


def test_scalar_metric_gives_the_same_scores(api, tiny, tokens_for):
    model, result, clean, corrupted = setting(api, tiny, tokens_for)
    per_seq = compare_attribution(model, result, None, clean, corrupted, logit_difference)
    scalar = compare_attribution(
        model, result, None, clean, corrupted, lambda lg, t: logit_difference(lg, t).mean()
    )
    for name in per_seq.sites:
        a, b = per_seq[name], scalar[name]
        torch.testing.assert_close(a.attribution, b.attribution, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(a.patching, b.patching, rtol=1e-10, atol=1e-14)


def test_input_errors(api, tiny, tokens_for):
    model, result, clean, corrupted = setting(api, tiny, tokens_for)
    for cut in (lambda lg, t: float(logit_difference(lg, t).mean()),
                lambda lg, t: logit_difference(lg, t).detach()):  # fmt: skip
        with pytest.raises(ValueError, match="the metric's value has no gradient"):
            compare_attribution(model, result, None, clean, corrupted, cut)
    with pytest.raises(ValueError, match="same shape"):
        compare_attribution(model, result, None, clean, corrupted[:3], logit_difference)
    with pytest.raises(KeyError, match="no basis at site"):
        compare_attribution(
            model, result, ["blocks.0.hook_resid_post"], clean, corrupted, logit_difference
        )
    with pytest.raises(ValueError, match="one value per sequence"):
        compare_attribution(model, result, None, clean, corrupted, lambda lg, t: lg[:, -1])
    with pytest.raises(ValueError, match=r"in a column; drop the last axis \(.squeeze\(-1\)\)"):
        compare_attribution(model, result, None, clean, corrupted, lambda lg, t: lg[:, -1, :1])
    one = "blocks.0.hook_resid_mid"
    with pytest.raises(TypeError, match=r"not one site: pass sites=\['blocks.0.hook_resid_mid'\]"):
        compare_attribution(model, result, one, clean, corrupted, logit_difference)
    with pytest.raises(ValueError, match="sites is empty"):
        compare_attribution(model, result, [], clean, corrupted, logit_difference)
    with pytest.raises(ValueError, match="max_rows must be a whole number of at least 1"):
        compare_attribution(model, result, [one], clean, corrupted, logit_difference, max_rows=0)
    basis = result[one]
    for bad in (-1, basis.k):
        with pytest.raises(IndexError, match=f"feature {bad} in groups is not a feature"):
            feature_patching_effects(model, basis, clean, corrupted, logit_difference, [[0, bad]])
    by_numpy = [[np.int64(0), torch.tensor(1)]]  # integers of any kind are feature ids
    torch.testing.assert_close(
        feature_patching_effects(model, basis, clean, corrupted, logit_difference, by_numpy),
        feature_patching_effects(model, basis, clean, corrupted, logit_difference, [[0, 1]]),
    )


def test_a_metric_that_is_nan_on_some_prompts_is_refused_where_it_arises(api, tiny, tokens_for):
    """It spread as NaN through every score, gave an infinite relative gap and a warning that
    blamed the basis's fit data."""
    model, result, clean, corrupted = setting(api, tiny, tokens_for)

    def nan_on_two(logits, tokens):
        value = logit_difference(logits, tokens)
        return torch.where(torch.arange(len(value)) < 2, torch.nan, value)

    with warnings.catch_warnings():
        warnings.simplefilter("error", AttributionGapWarning)
        with pytest.raises(ValueError, match=r"NaN or infinite \(2 of 12 sequences\)"):
            compare_attribution(model, result, None, clean, corrupted, nan_on_two)


def test_spearman_matches_scipy():
    gen = np.random.default_rng(0)
    x, y = gen.normal(size=40), gen.normal(size=40)
    y[:5] = y[5]  # ties
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert spearman(torch.arange(5.0), torch.arange(5.0) ** 3) == pytest.approx(1.0)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_json_table_and_html_escape_hostile_strings(api, tiny, tokens_for, tmp_path):
    model, result, clean, corrupted = setting(api, tiny, tokens_for)
    bases = {name: dataclasses.replace(b, kind=HOSTILE) for name, b in result.bases.items()}
    comparison = compare_attribution(
        model, bases, [SITES[1]], clean, corrupted, logit_difference, metric_name=HOSTILE
    )
    assert isinstance(comparison, AttributionComparison)
    rows = comparison.table()
    assert len(rows) == result[SITES[1]].k
    assert set(rows[0]) == {"site", "kind", "feature", "attribution", "patching", "importance"}
    assert len(comparison.table(top=2)) == 2
    data = json.loads(json.dumps(comparison.to_json(), allow_nan=False))
    assert data["metadata"]["batch_reduction"] == "mean over pairs"
    assert len(data["sites"][SITES[1].name]["attribution"]) == len(rows)
    for page in (comparison._repr_html_(), comparison.save_html(tmp_path / "a.html").read_text()):
        assert HOSTILE not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<img" in page  # the scatter plots
    comparison.save_json(tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text())["metadata"]["metric"] == HOSTILE
    loaded = AttributionComparison.load_json(tmp_path / "a.json")
    assert loaded.summary() == comparison.summary()
    sa = comparison[SITES[1].name]
    top = torch.argsort(sa.patching.abs(), descending=True)[:4]
    assert sa.correlations(top=4)["attribution~patching"] == pytest.approx(
        spearman(sa.attribution[top], sa.patching[top])
    )
    assert "rho=" in repr(comparison)


def test_format_correlation_table(api, tiny, tokens_for):
    model, result, clean, corrupted = setting(api, tiny, tokens_for)
    comparison = compare_attribution(model, result, None, clean, corrupted, logit_difference)
    text = format_correlation_table({"lib": comparison})
    assert text.count("\n") == 1 + len(comparison.sites)
    assert "| LIB | `blocks.0.hook_resid_mid` |" in text


def test_a_saved_comparison_loads_onto_the_same_weights_in_another_dtype(
    api, tiny, tokens_for, tmp_path
):
    """Its metadata comes from the one builder, with the weight fingerprint: the same weights
    in float32 load, other weights are refused naming one, and a file of the earlier format
    (the model's identity only) still loads onto its model."""
    import copy

    from tl_degeneracy.engine.artifacts import ArtifactError

    model, result, clean, corrupted = setting(api, tiny, tokens_for)
    comparison = compare_attribution(model, result, [SITES[1]], clean, corrupted, logit_difference)
    folder = comparison.save(tmp_path / "cmp")
    meta = json.loads((folder / "metadata.json").read_text())
    assert {"weight_fingerprint", "weight_processing", "model_dtype", "versions"} <= set(meta)
    loaded = AttributionComparison.load(folder, copy.deepcopy(model).to(torch.float32))
    assert loaded.summary() == comparison.summary() and loaded.metadata["n_pairs"] == 12
    with pytest.raises(ArtifactError, match=r"other weights: \S+ differs"):
        AttributionComparison.load(folder, tiny_model(api, seed=7))
    for field in ("weight_fingerprint", "weight_processing", "model_dtype", "versions", "sites"):
        meta.pop(field)
    meta["comparison"]["metadata"] = {k: v for k, v in meta.items() if k != "comparison"}
    (folder / "metadata.json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert AttributionComparison.load(folder, model).summary() == comparison.summary()


def test_a_compared_site_is_named_in_any_form(api, tiny, tokens_for):
    """`comparison[site]` and `table(site=...)` read a short form as `result[site]` does and
    refuse a site that was not compared, naming those that were (a typo gave no rows)."""
    model, result, clean, corrupted = setting(api, tiny, tokens_for)
    comparison = compare_attribution(model, result, None, clean, corrupted, logit_difference)
    name = SITES[1].name
    assert comparison[("resid_mid", 0)] is comparison.sites[name]
    rows = comparison.table(site=name)
    assert len(rows) == result[name].k and {r["site"] for r in rows} == {name}
    assert comparison.table(site=("resid_mid", 0)) == rows
    assert comparison.table(site=SITES[1], top=2) == comparison.table(site=name, top=2)
    with pytest.raises(KeyError, match=r"no comparison at site 'blocks.0.hook_resid_midd'"):
        comparison.table(site="blocks.0.hook_resid_midd")


def test_a_metric_that_does_not_tell_the_prompts_apart_is_warned(api, tiny, tokens_for):
    """logit(a) − logit(a): the metric is 0 on both prompts, every patching effect is 0 and ρ
    is nan. The your-own-model notebook met this on a character tokenizer (both names began
    with the same token) and printed rho=nan without a word."""
    model, result, clean, corrupted = setting(api, tiny, tokens_for)

    def same_token(logits, tokens):
        return logits[:, -1, 3] - logits[:, -1, 3]

    with pytest.warns(UserWarning, match="the metric is 0 on both the clean and the corrupted"):
        compare_attribution(model, result, None, clean, corrupted, same_token)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compare_attribution(model, result, None, clean, corrupted, logit_difference)


def test_the_page_scrolls_its_wide_summary_and_names_only_a_given_metric():
    """The 14-column summary sits in a horizontally scrollable box (the ρ columns stay
    reachable), and a metric without a name reads "Metric: clean …", not "Metric metric"."""
    from tl_degeneracy.engine.attribution.site_scores import SiteAttribution
    from tl_degeneracy.viz.html import render_fragment

    t = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    sa = SiteAttribution("blocks.0.hook_resid_mid", "lib", t, t, t.abs(), 0.4, None, 0.5, 4)
    cases = {
        "metric": "Metric: clean 1,",  # a function's own name, as compare_attribution records
        "<lambda>": "Metric: clean 1,",
        "logit diff": "Metric logit diff: clean 1,",
    }
    for given, intro in cases.items():
        comp = AttributionComparison({sa.site: sa}, 1.0, 0.0, {"metric": given, "n_pairs": 2})
        page = render_fragment(comp._html_sections())
        assert intro in page and "Metric metric" not in page
        summary = page[page.index("<h3>Summary</h3>") :]
        assert summary.index('<div class="tld-scroll">') < summary.index("<table")
