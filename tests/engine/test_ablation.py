"""Node ablation: the fast path (one capture, running sums, the last layer written out) gives
the same scores as rewriting the site's hook once per k."""

import math

import pytest
import torch

from tl_degeneracy.engine.ablation import (
    AblationCurve,
    last_position_accuracy,
    next_token_loss,
    node_ablation_curve,
    reads_last_position_only,
)
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.structures import autograd_only


def last_logit_of_label(tokens_to_label):
    """A continuous last-position metric: the logit of the label (ties cannot hide errors)."""

    def metric(logits, tokens):
        return logits[:, -1].gather(-1, tokens_to_label(tokens)[:, None])[:, 0].to(torch.float64)

    metric.last_position_only = True
    return metric


@pytest.mark.parametrize(
    "site",
    [
        Site("blocks.0.hook_resid_pre"),
        Site("blocks.0.hook_resid_pre", [0, 2]),  # not the last position: keys change only
        Site("blocks.0.hook_resid_mid", "last"),
        Site("blocks.0.hook_resid_mid"),
        Site("blocks.0.hook_resid_post", "last"),
    ],
    ids=lambda s: s.name,
)
def test_fast_node_ablation_equals_hook_path(api, tiny, tokens_for, site):
    model = tiny(api)
    toks = tokens_for(model, 30)
    sites = (site, Site("logits", "last"))
    lib = fit_basis(model, toks, LIBConfig(sites, progress=False))
    metric = last_logit_of_label(lambda t: t[:, 1])
    ks = [0, 1, 3, 3, lib[site].k]  # a repeated k is scored once, not summed twice
    fast = node_ablation_curve(model, lib, site.name, toks, metric, ks=ks, batch_size=7)
    with autograd_only():
        slow = node_ablation_curve(model, lib, site.name, toks, metric, ks=ks)
    for k in ks:
        assert fast.scores[k] == pytest.approx(slow.scores[k], rel=1e-10, abs=1e-10), k
    # every feature kept: the unablated score (up to the truncated directions, none here)
    assert fast.scores[lib[site].k] == pytest.approx(fast.baseline, rel=1e-9)


def test_accuracy_metric_reads_last_position_only():
    assert reads_last_position_only(last_position_accuracy(lambda t: t[:, 0]))
    assert not reads_last_position_only(lambda logits, tokens: logits[:, 0, 0])


def test_a_metric_gives_one_value_per_sequence(api, tiny, tokens_for):
    """A batch mean (what F.cross_entropy returns) or a value per token used to be averaged
    by rows in the curve but by values in the baseline, so keeping every feature did not
    score the baseline: both are refused, naming the shape expected."""
    import torch.nn.functional as F

    model = tiny(api)
    toks = tokens_for(model, 12)
    site = Site("blocks.0.hook_resid_mid")
    lib = fit_basis(model, toks, LIBConfig((site, Site("logits")), progress=False))

    def batch_mean(logits, tokens):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    def per_token(logits, tokens):
        return -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]

    for metric, shape in ((batch_mean, r"\(\): a scalar"), (per_token, r"\(5, 3\): a value per")):
        with pytest.raises(ValueError, match=rf"one value per sequence \(5,\), got shape {shape}"):
            node_ablation_curve(model, lib, site, toks, metric, ks=[0], batch_size=5)
    curve = node_ablation_curve(model, lib, site, toks, next_token_loss, ks=[lib[site].k])
    assert curve.scores[lib[site].k] == pytest.approx(curve.baseline, rel=1e-9)
    assert curve.metadata["metric"] == "next_token_loss"  # the view's y label names it


def test_a_site_is_named_in_any_form(api, tiny, tokens_for):
    """A short form reaches the basis its name does; the curve is keyed by the name."""
    model = tiny(api)
    toks = tokens_for(model, 12)
    site = Site("blocks.0.hook_resid_mid")
    lib = fit_basis(model, toks, LIBConfig((site, Site("logits")), progress=False))
    short = node_ablation_curve(model, lib, ("resid_mid", 0), toks, next_token_loss, ks=[0, 2])
    named = node_ablation_curve(model, lib, site.name, toks, next_token_loss, ks=[0, 2])
    assert short.site == site.name and short.scores == named.scores
    with pytest.raises(KeyError, match=r"no basis at site 'blocks.0.hook_resid_post'; sites"):
        node_ablation_curve(model, lib, ("resid_post", 0), toks, next_token_loss, ks=[0])


def test_a_nan_score_is_never_within_the_tolerance():
    """A curve whose small-k scores overflowed to NaN does not need "0 features"; with a NaN
    unablated score (or a NaN score at the largest k) nothing can be decided."""

    def curve(scores, baseline=3.0):
        return AblationCurve("s", "lib", scores, baseline, higher_is_better=False)

    nan = math.nan
    assert curve({0: nan, 4: nan, 16: 3.0}).min_k(0.05) == 16
    assert curve({0: 9.0, 4: nan, 8: 3.01, 16: 3.0}).min_k(0.05) == 8
    assert not curve({0: nan, 4: nan, 16: 3.0}).undecided
    for undecided in (curve({0: 9.0, 4: 5.0, 16: 3.0}, nan), curve({0: 3.0, 16: nan}), curve({})):
        assert undecided.min_k(0.05) is None and undecided.undecided
    assert curve({0: 9.0, 16: 3.0}).min_k(0.05) == 16
    assert curve({0: 9.0, 16: 4.0}).min_k(0.05) is None  # decided: none is within


def test_the_curve_view_names_its_metric_and_draws_the_unablated_score(drawn_figures):
    """An accuracy curve is not labelled "loss"; the unablated score is the dashed line the
    report's ablation plots draw."""
    seen = drawn_figures
    scores = {0: 0.10, 4: 0.62, 16: 0.97}
    accuracy = AblationCurve("blocks.0.hook_resid_mid", "lib", scores, 0.97, higher_is_better=True)
    page = accuracy._repr_html_()
    ax = seen[-1].axes[0]
    assert ax.get_ylabel() == "metric (higher is better)"
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [0.97, 0.97]
    assert "metric (higher is better): unablated score 0.97000" in page
    named = AblationCurve("s", "lib", scores, math.nan, False, metadata={"metric": "loss"})
    named._repr_html_()  # a NaN baseline draws no line
    ax = seen[-1].axes[0]
    assert ax.get_ylabel() == "loss (lower is better)"
    assert not [line for line in ax.lines if line.get_linestyle() == "--"]
