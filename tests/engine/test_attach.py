import torch

from tl_degeneracy.engine.ablation import (
    ablation_schedule,
    last_position_accuracy,
    next_token_loss,
    node_ablation_curve,
)
from tl_degeneracy.engine.attach import ablate_nodes, attach, feature_hook_name, site_features
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sites import Site

SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid", "last"),
    Site("logits", "last"),
)


def test_attached_features_are_cacheable_and_exact(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 30)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    with torch.no_grad():
        base = model(toks)
        with attach(model, result):
            out, cache = model.run_with_cache(toks)
        names = [feature_hook_name(result[s]) for s in SITES[:2]]
        assert names[0] == "blocks.0.hook_resid_pre.hook_lib_features"
        for s, name in zip(SITES[:2], names):
            torch.testing.assert_close(cache[name], site_features(model, result, toks)[s.name])
    assert torch.equal(out, base)
    # hook points are gone after the block, and the forward is the plain one
    assert names[0] not in model.hook_dict
    with torch.no_grad():
        assert torch.equal(model(toks), base)


def test_editing_a_feature_changes_the_output(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 10)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    name = feature_hook_name(result[SITES[1]])

    def zero_top(feats, hook=None):
        feats = feats.clone()
        feats[..., 0] = 0
        return feats

    with torch.no_grad():
        base = model(toks)
        with attach(model, result):
            edited = model.run_with_hooks(toks, fwd_hooks=[(name, zero_top)])
        with ablate_nodes(model, result, SITES[1], result[SITES[1]].k):
            kept_all = model(toks)
    assert not torch.allclose(edited, base)
    torch.testing.assert_close(kept_all, base, rtol=0, atol=1e-10)


def test_node_ablation_keeps_mean_plus_top_k(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 30)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    b = result[SITES[1]]
    seen = {}
    with torch.no_grad(), ablate_nodes(model, result, SITES[1], 2):
        model.run_with_hooks(
            toks, fwd_hooks=[(SITES[1].hook, lambda a, hook: seen.update(a=a[:, -1].clone()))]
        )
    feats = b.features(seen["a"])
    assert feats[:, 2:].abs().max() < 1e-10
    torch.testing.assert_close(
        feats[:, :2], site_features(model, result, toks)[SITES[1].name][:, 0, :2]
    )


def test_ablation_curve(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 40)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    k = result[SITES[1]].k
    loss = node_ablation_curve(
        model, result, SITES[1].name, toks, next_token_loss, higher_is_better=False
    )
    assert sorted(loss.scores) == ablation_schedule(k)
    assert abs(loss.scores[k] - loss.baseline) < 1e-10
    assert loss.min_k(1e-9) <= k
    acc = node_ablation_curve(
        model, result, SITES[1].name, toks, last_position_accuracy(lambda t: t[:, 0]), ks=[0, k]
    )
    assert acc.scores[k] == acc.baseline


def test_schedule():
    assert ablation_schedule(30) == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        13,
        14,
        15,
        16,
        17,
        18,
        19,
        20,
        21,
        23,
        25,
        27,
        29,
        30,
    ]
    assert ablation_schedule(5) == [0, 1, 2, 3, 4, 5]


def test_ablation_curve_html(api, tiny, tokens_for, tmp_path):
    model = tiny(api)
    toks = tokens_for(model, 10)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    curve = node_ablation_curve(
        model, result, SITES[1].name, toks, next_token_loss, ks=[0, 2], higher_is_better=False
    )
    page = curve.save_html(tmp_path / "curve.html").read_text()
    assert "node ablation" in page and "data:image/png;base64" in page


def test_counts_of_kept_features_are_checked(api, tiny, tokens_for):
    """A negative count would slice as 'all but the last |k|'; it is refused by name. A count
    above the basis's width keeps every feature (one schedule serves sites of any width)."""
    import numpy as np
    import pytest

    model = tiny(api)
    toks = tokens_for(model, 30)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    k = result[SITES[1]].k
    metric = next_token_loss
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="features to keep at blocks.0.hook_resid_mid"):
            with ablate_nodes(model, result, SITES[1], bad):
                pass
        with pytest.raises(ValueError, match="whole number from 0"):
            node_ablation_curve(model, result, SITES[1].name, toks, metric, ks=[0, bad])
    with torch.no_grad():
        base = model(toks)
        with ablate_nodes(model, result, SITES[1], np.int64(k + 50)):
            above = model(toks)
    torch.testing.assert_close(above, base, rtol=0, atol=1e-10)
    curve = node_ablation_curve(model, result, SITES[1].name, toks, metric, ks=[k, k + 50])
    assert curve.scores[k + 50] == curve.scores[k]
