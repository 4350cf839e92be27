import pytest
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


def zero_top(feats, hook=None):
    """An edit of attached features: the top one set to 0."""
    feats = feats.clone()
    feats[..., 0] = 0
    return feats


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


def test_an_attach_inside_another_gives_the_outer_features_back(api, tiny, tokens_for):
    """`ablate_nodes` (or a second `attach`) inside `attach` shadows the outer feature hook
    points and puts them back when it closes: they are cached, and an edit there still
    applies (it used to be gone, a KeyError or, on a Bridge, silently not applied)."""
    model = tiny(api)
    toks = tokens_for(model, 10)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    name = feature_hook_name(result[SITES[1]])

    with torch.no_grad(), attach(model, result):
        edited = model.run_with_hooks(toks, fwd_hooks=[(name, zero_top)])
        _, cache = model.run_with_cache(toks)
        for inner in (ablate_nodes(model, result, SITES[1], 1), attach(model, result)):
            with inner:
                model(toks)
            _, again = model.run_with_cache(toks)
            assert sorted(k for k in again if k.endswith("_features")) == sorted(
                k for k in cache if k.endswith("_features")
            )
            torch.testing.assert_close(again[name], cache[name], rtol=0, atol=0)
            torch.testing.assert_close(
                model.run_with_hooks(toks, fwd_hooks=[(name, zero_top)]), edited, rtol=0, atol=0
            )
    assert name not in model.hook_dict


def test_a_callers_hook_context_closed_out_of_order_leaves_nothing_behind(api, tiny, tokens_for):
    """`attach` closed before a `model.hooks` opened inside it: each removes its own hooks
    and the caller's hook does not outlive its context."""
    model = tiny(api)
    toks = tokens_for(model, 4)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    calls = []
    outer = attach(model, result)
    outer.__enter__()
    mine = model.hooks(
        fwd_hooks=[("blocks.0.hook_resid_mid", lambda a, hook=None: calls.append(1))]
    )
    mine.__enter__()
    outer.__exit__(None, None, None)
    mine.__exit__(None, None, None)
    with torch.no_grad():
        model(toks)
    assert calls == []
    assert getattr(model, "context_level", 0) == 0
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_editing_a_feature_changes_the_output(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 10)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    name = feature_hook_name(result[SITES[1]])

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


def test_a_basis_that_does_not_fit_the_model_is_refused_by_name(api, tiny, tokens_for):
    """A wider model (residual width known from its config), a model with other MLP widths
    (a composite site's width, known at its first activation) and a shallower model each
    raise `ArtifactError` naming the site and the widths or the missing hook, where torch
    raised a shape error inside a hook or a bare KeyError."""
    import pytest

    from tl_degeneracy.engine.artifacts import ArtifactError

    sites = (Site("blocks.0.mlp.hook_post"), Site("blocks.1.hook_resid_pre"), Site("logits"))
    model = tiny(api, "ln", n_layers=2)
    toks = tokens_for(model, 20)
    result = fit_basis(model, toks, LIBConfig(sites, progress=False))
    wide = tiny(api, "ln", n_layers=2, d_model=12, d_head=6)
    other_mlp = tiny(api, "ln", n_layers=2, d_mlp=20)
    short = tiny(api, "ln", n_layers=1)
    with pytest.raises(ArtifactError, match="blocks.1.hook_resid_pre the basis is 8 wide.*12 wide"):
        with attach(wide, result):
            pass
    with pytest.raises(ArtifactError, match="mlp.hook_post the basis is 24 wide.* is 28 wide"):
        with torch.no_grad(), ablate_nodes(other_mlp, result, sites[0], 2, check_weights=False):
            other_mlp(toks[:2])
    with pytest.raises(ArtifactError, match="needs the hook 'blocks.1.hook_resid_pre'.*1 layers"):
        with ablate_nodes(short, result, sites[0], 2):
            pass
    assert not [n for n in short.hook_dict if "features" in n]  # nothing left registered


def test_attaching_to_a_model_with_other_weights_warns_once(api, tiny, tokens_for):
    """A basis applied to a model whose weights differ from the ones it was fitted on (a
    fine-tuned variant is a legitimate use) warns once per model and difference, never on
    its own model, and not with check_weights=False."""
    import copy
    import warnings

    import pytest

    model = tiny(api)
    toks = tokens_for(model, 30)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in tuned.named_parameters() if "mlp" in n and p.ndim >= 2).mul_(1.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with attach(model, result), ablate_nodes(model, result, SITES[1], 2):
            pass
        with attach(tuned, result, check_weights=False):
            pass
    with pytest.warns(UserWarning, match="other weights.*fine-tuned.*check_weights=False"):
        with attach(tuned, result):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.simplefilter("error", UserWarning)
        with attach(tuned, result), ablate_nodes(tuned, result, SITES[1], 2):
            pass


def test_every_entry_point_that_applies_a_basis_checks_the_model(api, tiny, tokens_for):
    """Prompt graphs, interventions, attribution comparisons and node-ablation curves refuse a
    basis that cannot act on the model and warn (once) for one fitted on other weights, as
    attach does."""
    import warnings

    import pytest

    from tl_degeneracy.engine.artifacts import ArtifactError
    from tl_degeneracy.engine.attribution import compare_attribution
    from tl_degeneracy.engine.prompt_graph import Target, prompt_graph
    from tl_degeneracy.engine.prompt_graph.compare import compare_with_patching
    from tl_degeneracy.engine.prompt_graph.interventions import intervene

    model = tiny(api)
    toks = tokens_for(model, 30)
    result = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    wider = tiny(api, d_model=12, seed=5)
    prompt, corrupted = toks[:1], toks[1:2]
    target = Target.logit_difference(3, 4)

    def metric(logits, tokens):
        return logits[:, -1, 3] - logits[:, -1, 4]

    calls = {
        "prompt_graph": lambda m: prompt_graph(m, result, prompt, target),
        "compare_with_patching": lambda m: compare_with_patching(
            m, result, prompt, corrupted, target, top=2
        ),
        "compare_attribution": lambda m: compare_attribution(
            m, result, None, toks[:4], toks[4:8], metric
        ),
        "node_ablation_curve": lambda m: node_ablation_curve(
            m, result, SITES[1].name, toks, metric, ks=[1]
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ArtifactError, match="the basis does not fit this model"):
            call(wider)
        with pytest.warns(UserWarning, match="other weights"):
            call(tiny(api, seed=5 + len(name)))  # a fresh model: the warning is once per model
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call(model)  # the model it was fitted on: silent
    with pytest.raises(ArtifactError, match="the basis does not fit this model"):
        intervene(wider, result, prompt, target, [(SITES[1].hook, -1, 0)])


def test_parallel_blocks_read_composite_features_and_ablate_elsewhere(api):
    """GPT-NeoX: the MLP site's stream part also feeds attention, so it cannot be rewritten
    inside the forward. attach used to refuse any basis holding such a site (even to ablate a
    residual site); now its features are read (cacheable) and only editing them is refused."""
    import pytest

    from tl_degeneracy.engine.sites import SiteError, residual_sites
    from tl_degeneracy.models.tiny import tiny_model

    model = tiny_model("neox", api=api, dtype=torch.float64)
    toks = torch.randint(3, 50, (16, 8), generator=torch.Generator().manual_seed(0))
    result = fit_basis(
        model, toks, LIBConfig(tuple(residual_sites(model, mlp=(1,))), progress=False)
    )
    mlp = next(s for s in result.bases if "mlp" in s)
    resid = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        base = model(toks)
        with attach(model, result):
            out, cache = model.run_with_cache(toks)
        assert torch.equal(out, base)
        torch.testing.assert_close(
            cache[feature_hook_name(result[mlp])], site_features(model, result, toks)[mlp]
        )
        curve = node_ablation_curve(model, result, resid, toks, next_token_loss, ks=[2])
        with ablate_nodes(model, result, resid, k=2):
            ablated = next_token_loss(model(toks), toks).mean()
        torch.testing.assert_close(ablated.double(), torch.tensor(curve.scores[2]).double())
        with pytest.raises(SiteError, match="read, not edited"):
            with ablate_nodes(model, result, mlp, k=2):
                pass

        def zero_top(feats, hook=None):
            return torch.zeros_like(feats)

        with attach(model, result), pytest.raises(SiteError, match="read, not edited"):
            model.run_with_hooks(toks, fwd_hooks=[(feature_hook_name(result[mlp]), zero_top)])


def test_sites_to_ablate_are_named_in_any_form(api, tiny, tokens_for):
    """`ablate_nodes` and `attach(keep=...)` take a short form as `result[site]` does, and
    refuse a site without a basis by naming the sites."""
    model = tiny(api)
    toks = tokens_for(model, 10)
    sites = (Site("blocks.0.hook_resid_mid"), Site("logits"))
    result = fit_basis(model, toks, LIBConfig(sites, progress=False))
    with torch.no_grad():
        with ablate_nodes(model, result, "blocks.0.hook_resid_mid", 2):
            by_name = model(toks)
        with ablate_nodes(model, result, ("resid_mid", 0), 2):
            short = model(toks)
        with attach(model, result, keep={("resid_mid", 0): 2}):
            kept = model(toks)
        assert not torch.allclose(by_name, model(toks))
    assert torch.equal(short, by_name) and torch.equal(kept, by_name)
    with pytest.raises(KeyError, match=r"no basis to ablate at site 'blocks.0.hook_resid_pre'"):
        with ablate_nodes(model, result, ("resid_pre", 0), 2):
            pass


@pytest.mark.parametrize(("positions", "refused"), [((1, 3), True), (":3", True), ("1:", False)])
def test_attention_site_edits_inside_the_forward_are_exact_or_refused(api, positions, refused):
    """An attention site's stream part reaches the stream after attention: exact when the site
    holds every position from the first edited one on, since its heads' outputs are written
    there (ablate_nodes equals node_ablation_curve, which writes before the block); refused
    where attention at a later position left out of the site would read the old stream (it
    gave 2.323 against 2.244)."""
    from tl_degeneracy.engine.sites import SiteError, residual_sites
    from tl_degeneracy.models.tiny import tiny_model

    model = tiny_model("gpt2", api=api)
    toks = torch.randint(3, 50, (16, 6), generator=torch.Generator().manual_seed(0))
    sites = residual_sites(model, positions=positions, attn=(0,))
    result = fit_basis(model, toks, LIBConfig(tuple(sites), progress=False))
    attn = next(s for s in result.bases if "attn" in s)
    curve = node_ablation_curve(model, result, attn, toks, next_token_loss, ks=[1])
    with torch.no_grad():
        if refused:
            with pytest.raises(SiteError, match="which the site leaves out"):
                with ablate_nodes(model, result, attn, k=1):
                    model(toks)
            return
        with ablate_nodes(model, result, attn, k=1):
            ablated = next_token_loss(model(toks), toks).mean().double()
    assert abs(float(ablated) - curve.scores[1]) < 1e-10
