"""The identities of the bases (docs/concepts.md, "Bases"), on small random float64 models of
every available API."""

import pytest
import torch

from tl_degeneracy.engine.bases import SiteBasis, Truncation, interaction_basis, pca_basis
from tl_degeneracy.engine.compat import (
    build_model,
    hooked_state_dict,
    model_config,
    replace_hooks,
    run_with_hooks,
)
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.jacobians import jacobian_gram
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.statistics import capture_sites, collect_statistics

SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid", "last"),
    Site("blocks.0.hook_resid_post", "last"),
    Site("logits", "last"),
)


def test_lib_identities(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 64)
    stats = collect_statistics(model, SITES, toks, progress=False)
    site, nxt = SITES[1], SITES[2]
    out_basis = pca_basis(nxt, stats[nxt].mean, stats[nxt].gram).C
    m_prime = jacobian_gram(model, toks, Section(site, nxt), out_basis, progress=False).matrix
    b = interaction_basis(site, stats[site].mean, stats[site].gram, m_prime)
    eye = torch.eye(b.k, dtype=torch.float64)
    torch.testing.assert_close(
        b.C.T @ stats[site].gram @ b.C,
        torch.diag(b.importance),
        rtol=1e-10,
        atol=1e-10 * float(b.importance[0]),
    )
    torch.testing.assert_close(b.C_pinv @ m_prime @ b.C_pinv.T, eye, rtol=0, atol=1e-9)
    torch.testing.assert_close(b.C_pinv @ b.C, eye, rtol=0, atol=1e-10)
    assert torch.all(b.importance[:-1] >= b.importance[1:])
    # each feature's mean square on the data equals its Λ
    act = capture_sites(model, toks, [site])[0]
    feats = b.features(act.reshape(-1, act.shape[-1]))
    torch.testing.assert_close(feats.pow(2).mean(0), b.importance, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["lib", "ib", "pca", "neuron"])
def test_rotate_and_back_leaves_logits_unchanged(api, tiny, tokens_for, kind):
    model = tiny(api)
    toks = tokens_for(model, 40)
    result = fit_basis(model, toks, LIBConfig(SITES, kind=kind, progress=False))
    with torch.no_grad():
        base = model(toks)
        for _name, b in result.bases.items():
            if b.site.is_logits or b.k < b.d:
                continue

            def through_basis(a, b=b):
                idx = b.site.index(a.shape[1])
                return a.index_copy(1, idx, b.reconstruct(b.features(a[:, idx])).to(a.dtype))

            out = run_with_hooks(model, toks, replace_hooks(model, b.site.hook, through_basis))
            torch.testing.assert_close(out, base, rtol=0, atol=1e-10)


def test_deep_linear_network_is_diagonal(api, tiny, tokens_for):
    """Linear sections: the map between consecutive LIB feature sets is diag(±1), and Λ is
    the same at every site."""
    model = tiny(api, "linear")
    sites = [Site(f"blocks.{i}.hook_resid_pre") for i in range(3)] + [Site("logits")]
    toks = torch.arange(model.cfg.d_vocab)[:, None]
    result = fit_basis(model, toks, LIBConfig(tuple(sites), progress=False))
    acts = capture_sites(model, toks, sites[:3])
    feats = [result[s].features(a[:, 0]) for s, a in zip(sites, acts)]
    for a, b in zip(feats, feats[1:]):
        t = torch.linalg.lstsq(a, b).solution
        torch.testing.assert_close(t.abs(), torch.eye(t.shape[0], dtype=t.dtype), rtol=0, atol=1e-8)
    lams = [result[s].importance for s in sites[:3]]
    torch.testing.assert_close(lams[0], lams[2], rtol=1e-9, atol=1e-12 * float(lams[0][0]))


def _reparameterise(sd: dict, a: torch.Tensor) -> dict:
    """Change the residual stream's basis to f A: writers get A, readers get A⁻¹."""
    inv = torch.linalg.inv(a)
    out = dict(sd)
    for key, value in sd.items():
        if key in ("embed.W_E", "pos_embed.W_pos") or key.endswith(("attn.b_O", "mlp.b_out")):
            out[key] = value @ a
        elif key.endswith(("attn.W_O", "mlp.W_out")):
            out[key] = value @ a
        elif key.endswith(("attn.W_Q", "attn.W_K", "attn.W_V")):
            out[key] = inv @ value
        elif key.endswith("mlp.W_in") or key == "unembed.W_U":
            out[key] = inv @ value
    return out


@pytest.mark.parametrize("orthogonal", [False, True])
def test_invariant_to_undone_reparameterisation(api, tiny, tokens_for, orthogonal):
    model = tiny(api)
    cfg = model_config(model)
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    a = torch.linalg.qr(a)[0] if orthogonal else a + 3 * torch.eye(8, dtype=torch.float64)
    other = build_model(
        cfg, _reparameterise(hooked_state_dict(model), a), api=api, dtype=torch.float64
    )
    toks = tokens_for(model, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(toks), model(toks), rtol=0, atol=1e-9)
    # final site: raw logits for any invertible A; PCA of a rotated site for orthogonal A
    sites = SITES if not orthogonal else SITES[:3]
    final = "raw" if not orthogonal else "pca"
    res_a = fit_basis(model, toks, LIBConfig(sites, final_basis=final, progress=False))
    res_b = fit_basis(other, toks, LIBConfig(sites, final_basis=final, progress=False))
    acts_a = capture_sites(model, toks, list(sites[:-1]))
    acts_b = capture_sites(other, toks, list(sites[:-1]))
    for site, xa, xb in zip(sites[:-1], acts_a, acts_b):
        ba, bb = res_a[site], res_b[site]
        torch.testing.assert_close(bb.importance, ba.importance, rtol=1e-7, atol=1e-9)
        fa = ba.features(xa.reshape(-1, 8))
        fb = bb.features(xb.reshape(-1, 8))
        signs = torch.sign((fa * fb).sum(0))
        torch.testing.assert_close(fb * signs, fa, rtol=0, atol=1e-6 * float(fa.abs().max()))


def test_truncation_settings():
    site = Site("x")
    gram = torch.diag(torch.tensor([4.0, 1.0, 1e-13, 0.0], dtype=torch.float64))
    mean = torch.zeros(4, dtype=torch.float64)
    assert pca_basis(site, mean, gram).k == 3
    assert pca_basis(site, mean, gram, Truncation(relative=1e-12)).k == 2
    assert pca_basis(site, mean, gram, Truncation(absolute=2.0)).k == 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"relative": -1.0}, r"relative must be a number in \[0, 1\).*got -1.0"),
        ({"relative": 1.0}, r"relative must be a number in \[0, 1\).*got 1.0"),
        ({"absolute": -5.0}, r"absolute must be a finite number ≥ 0.*got -5.0"),
        ({"absolute": float("nan")}, "absolute must be a finite number"),
        ({"absolute": "1e-15"}, "absolute must be a finite number"),
    ],
)
def test_truncation_out_of_range_is_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        Truncation(**setting)


def test_truncation_tells_when_it_emptied_a_basis():
    """A basis left empty by cut-offs that drop what the default keeps, not by a spectrum
    that is all ~0 (activations that do not vary)."""
    site, mean = Site("x"), torch.zeros(2, dtype=torch.float64)
    varied = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    cut = Truncation(absolute=10.0)
    assert pca_basis(site, mean, varied, cut).k == 0 and cut.emptied(
        pca_basis(site, mean, varied, cut)
    )
    flat = pca_basis(site, mean, torch.zeros(2, 2, dtype=torch.float64), cut)
    assert flat.k == 0 and not cut.emptied(flat)
    lib = interaction_basis(site, mean, varied, varied, cut)
    assert lib.k == 0 and cut.emptied(lib)


def _raw(importance: list[float]) -> SiteBasis:
    d = len(importance)
    eye = torch.eye(d, dtype=torch.float64)
    z = torch.zeros(d, dtype=torch.float64)
    imp = torch.tensor(importance, dtype=torch.float64)
    return SiteBasis(Site("blocks.0.hook_resid_post"), "raw", eye, eye.clone(), imp, z, imp)


def test_a_raw_sites_features_are_ranked_by_importance():
    """A raw site's coordinates come in model order: its most important features are the
    coordinates of largest variance, which the fit summary and `top_features` list, most
    important first; a sorted basis keeps its column order (ties and all)."""
    from tl_degeneracy.engine.basis_result import BasisResult

    raw = _raw([1.0, 5.0, 2.0, 6.0, float("nan"), 3.0])
    assert raw.importance_order().tolist() == [3, 1, 5, 2, 0, 4]  # NaN last
    result = BasisResult({raw.site.name: raw}, {"kind": "lib"})
    assert result.top_features(raw.site, 3) == [(3, 6.0), (1, 5.0), (5, 3.0)]
    assert result.summary_rows()[0]["top importance"] == [6.0, 5.0, 3.0, 2.0, 1.0]
    # truncation keeps the first columns (edges into it keep row i = coordinate i)
    assert torch.equal(raw.truncated(2).C, torch.eye(6, dtype=torch.float64)[:, :2])
    sorted_imp = torch.tensor([3.0, 2.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    flat = SiteBasis(raw.site, "pca", raw.C, raw.C_pinv, sorted_imp, raw.mean, sorted_imp)
    assert flat.importance_order().tolist() == list(range(6))
    assert BasisResult({raw.site.name: flat}, {}).top_features(raw.site, 2) == [(0, 3.0), (1, 2.0)]


def test_each_feature_has_one_sign_whatever_the_eigensolver_returns():
    """Eigenvector signs are arbitrary and flip with rounding (another thread count, BLAS or
    torchrun's rank order); stochastic `M'` draws its sources on the output features, so a
    flipped column changed every section upstream by 1e-3 where runs should agree to rounding.
    Each column of C now has its largest entry positive, and inputs that differ by rounding
    give C that differ by rounding, not by sign."""
    gen = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(40, 12, generator=gen, dtype=torch.float64),
        torch.randn(40, 12, generator=gen, dtype=torch.float64),
    )
    gram, m_prime = a.T @ a / 40, b.T @ b / 40
    site, mean = Site("blocks.0.hook_resid_mid"), torch.zeros(12, dtype=torch.float64)
    for basis in (pca_basis(site, mean, gram), interaction_basis(site, mean, gram, m_prime)):
        top = basis.C.abs().argmax(0)
        assert bool((basis.C[top, torch.arange(basis.k)] > 0).all())
        torch.testing.assert_close(basis.C_pinv @ basis.C, torch.eye(basis.k, dtype=torch.float64))
    base = interaction_basis(site, mean, gram, m_prime)
    noisy = interaction_basis(site, mean, gram * (1 + 1e-15), m_prime * (1 - 1e-15))
    torch.testing.assert_close(noisy.C, base.C, rtol=1e-9, atol=1e-12)
