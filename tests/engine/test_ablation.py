"""Node ablation: the fast path (one capture, running sums, the last layer written out) gives
the same scores as rewriting the site's hook once per k."""

import pytest
import torch

from tl_degeneracy.engine.ablation import (
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
