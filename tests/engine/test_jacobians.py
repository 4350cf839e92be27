import pytest
import torch

from tl_degeneracy.engine.compat import available_apis, rebuild
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.jacobians import JacobianConfig, jacobian_gram
from tl_degeneracy.engine.sections import Section, run_section
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.structures import autograd_only, structure_of


def closed_form_kind(model, section):
    st = structure_of(model, section)
    return st.describe().removeprefix("closed_form:") if st.closed_form else None


PRE, MID, POST = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid", "last"),
    Site("blocks.0.hook_resid_post", "last"),
)


def brute_force_m_prime(model, toks, section, out_basis=None):
    """M' from full per-example Jacobians (torch.autograd.functional.jacobian)."""
    total = 0
    count = 0
    for b in range(toks.shape[0]):
        tok = toks[b : b + 1]
        with torch.no_grad():
            x0 = run_section(model, tok, Section(section.inp, section.inp), lambda a: a)

        def f(x, tok=tok):
            y = run_section(model, tok, section, lambda a: x)
            return y if out_basis is None else y @ out_basis

        jac = torch.autograd.functional.jacobian(f, x0)  # [1, T, k, 1, P, d]
        jac = jac[0, :, :, 0]  # [T, k, P, d]
        for s in range(jac.shape[2]):
            js = jac[:, :, s, :].reshape(-1, jac.shape[-1])
            total = total + js.T @ js
        count += jac.shape[2]
    return total / count


@pytest.mark.parametrize(
    "section", [Section(PRE, MID), Section(PRE, Site("logits")), Section(MID, POST)]
)
def test_exact_matches_brute_force(api, tiny, tokens_for, section):
    model = tiny(api)
    toks = tokens_for(model, 6)
    out_basis = (
        torch.randn(model.cfg.d_model, 5, dtype=torch.float64)
        if section.out.hook != "logits"
        else None
    )
    with autograd_only():
        jg = jacobian_gram(
            model,
            toks,
            section,
            out_basis,
            JacobianConfig(method="exact", chunk_size=3),
            batch_size=4,
            progress=False,
        )
    expected = brute_force_m_prime(model, toks, section, out_basis)
    torch.testing.assert_close(jg.matrix, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "section,kind",
    [
        (Section(MID, POST), "relu_mlp"),
        (Section(Site("blocks.0.hook_resid_post"), Site("logits")), "affine"),
        (
            Section(
                Site("blocks.0.hook_resid_mid", [1, 3]), Site("blocks.0.hook_resid_post", [0, 3])
            ),
            "relu_mlp",
        ),
        (Section(PRE, MID), "attention"),
        (Section(PRE, Site("blocks.0.hook_resid_mid")), "attention"),
        (
            Section(
                Site("blocks.0.hook_resid_pre", [0, 2, 3]), Site("blocks.0.hook_resid_mid", [1, 3])
            ),
            "attention",
        ),
    ],
)
def test_closed_forms_equal_autograd(api, tiny, tokens_for, section, kind):
    model = tiny(api)
    assert closed_form_kind(model, section) == kind
    toks = tokens_for(model, 20)
    out_basis = (
        torch.randn(model.cfg.d_model, 6, dtype=torch.float64)
        if kind in ("relu_mlp", "attention")
        else None
    )
    fast = jacobian_gram(model, toks, section, out_basis, progress=False)
    with autograd_only():
        slow = jacobian_gram(model, toks, section, out_basis, progress=False)
    assert fast.method.startswith("closed_form") and slow.method == "exact"
    torch.testing.assert_close(fast.matrix, slow.matrix, rtol=1e-11, atol=1e-11)


def test_attention_closed_form_in_a_deeper_model(api, tiny, tokens_for):
    """Block 1 of a two-layer model, raw output coordinates, batches merged."""
    model = tiny(api, n_layers=2, seed=3)
    section = Section(Site("blocks.1.hook_resid_pre"), Site("blocks.1.hook_resid_mid"))
    toks = tokens_for(model, 9)
    fast = jacobian_gram(model, toks, section, None, batch_size=4, progress=False)
    with autograd_only():
        slow = jacobian_gram(model, toks, section, None, batch_size=4, progress=False)
    assert fast.method == "closed_form:attention"
    torch.testing.assert_close(fast.matrix, slow.matrix, rtol=1e-11, atol=1e-11)


def test_no_closed_form_with_layernorm(tiny):
    model = tiny(available_apis()[0], "ln")
    assert closed_form_kind(model, Section(MID, POST)) is None
    assert closed_form_kind(model, Section(PRE, MID)) is None


@pytest.mark.parametrize("over", ["both", "positions", "units"])
def test_stochastic_converges_to_exact(api, tiny, tokens_for, over):
    model = tiny(api)
    toks = tokens_for(model, 64)
    section = Section(PRE, Site("blocks.0.hook_resid_post"))
    with autograd_only():
        exact = jacobian_gram(model, toks, section, None, progress=False).matrix
    errors = []
    for r in (1, 8, 64):
        est = jacobian_gram(
            model,
            toks,
            section,
            None,
            JacobianConfig(method="stochastic", n_sources=r, sources_over=over, chunk_size=64),
            batch_size=16,
            progress=False,
        )
        errors.append(float(torch.linalg.norm(est.matrix - exact) / torch.linalg.norm(exact)))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.25 * errors[0]  # 1/sqrt(R): 8x fewer errors expected
    assert errors[2] < 0.05


def test_stochastic_is_reproducible_per_batch(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 12)
    cfg = JacobianConfig(method="stochastic", n_sources=2, seed=3)
    a = jacobian_gram(model, toks, Section(PRE, MID), None, cfg, batch_size=4, progress=False)
    b = jacobian_gram(model, toks, Section(PRE, MID), None, cfg, batch_size=4, progress=False)
    assert torch.equal(a.matrix, b.matrix)
    assert a.split_half_rel_error > 0


def test_one_batch_has_no_split_half_error(api, tiny, tokens_for):
    """All data in one batch leaves one half empty: the error is unknown (None), not 0, which
    would read as exact; the fit's metadata and the result's page say so."""
    model = tiny(api)
    toks = tokens_for(model, 12)
    cfg = JacobianConfig(method="stochastic", n_sources=2, seed=3)
    one = jacobian_gram(model, toks, Section(PRE, MID), None, cfg, batch_size=12, progress=False)
    assert one.split_half_rel_error is None
    assert "n/a (one batch)" in one._repr_html_()
    sites = (PRE, MID, Site("logits", "last"))
    lib = fit_basis(model, toks, LIBConfig(sites, jacobian=cfg, batch_size=64, progress=False))
    assert lib.metadata["jacobian_errors"] == {PRE.name: None, MID.name: None}
    two = fit_basis(model, toks, LIBConfig(sites, jacobian=cfg, batch_size=6, progress=False))
    assert all(e > 0 for e in two.metadata["jacobian_errors"].values())


@pytest.mark.skipif(len(available_apis()) < 2, reason="HookedTransformer needs TransformerLens < 4")
def test_both_apis_give_the_same_m_prime(tiny, tokens_for):
    hooked = tiny("hooked")
    bridge = rebuild(hooked, "bridge")
    toks = tokens_for(hooked, 10)
    for section in (Section(PRE, MID), Section(MID, POST), Section(PRE, Site("logits", "last"))):
        a = jacobian_gram(
            hooked, toks, section, None, JacobianConfig(method="exact"), progress=False
        )
        b = jacobian_gram(
            bridge, toks, section, None, JacobianConfig(method="exact"), progress=False
        )
        torch.testing.assert_close(a.matrix, b.matrix, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"n_sources": 0}, "n_sources must be a whole number of at least 1, got 0"),
        ({"n_sources": 2.5}, "n_sources must be a whole number of at least 1, got 2.5"),
        ({"chunk_size": 0}, "chunk_size must be a whole number of at least 1, got 0"),
        ({"sources_over": "rows"}, "sources_over must be one of both, positions, units"),
        ({"stats_device": "gpu"}, "'gpu' is not a device"),
        ({"stats_device": "cuda:99"}, "device 'cuda:99'"),  # named before a fit, as LIBConfig
    ],
)
def test_a_setting_out_of_range_is_refused_when_made(setting, message):
    """`n_sources=0` used to reach a division by zero inside the first M' pass."""
    with pytest.raises(ValueError, match=message):
        JacobianConfig(method="stochastic", **setting)


def test_out_basis_may_be_the_output_sites_basis(tiny, tokens_for):
    """`jacobian_gram(..., lib[section.out])` used to fail deep inside with "'SiteBasis' object
    has no attribute 'T'": a SiteBasis stands for its `C`; another site's basis, or anything
    but a basis or a tensor, is named."""
    model = tiny(available_apis()[0])
    toks = tokens_for(model, 6)
    sites = (PRE, MID, POST)
    lib = fit_basis(model, toks, LIBConfig(sites, batch_size=64, progress=False))
    section = Section(MID, POST)
    given = jacobian_gram(model, toks, section, lib[POST], progress=False)
    as_matrix = jacobian_gram(model, toks, section, lib[POST].C, progress=False)
    torch.testing.assert_close(given.matrix, as_matrix.matrix, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out_basis is the basis of blocks.0.hook_resid_mid"):
        jacobian_gram(model, toks, section, lib[MID], progress=False)
    with pytest.raises(TypeError, match=r"out_basis must be the output site's SiteBasis"):
        jacobian_gram(model, toks, section, lib, progress=False)  # type: ignore[arg-type]
