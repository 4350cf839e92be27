import pytest
import torch

from tl_degeneracy.engine.edges import EdgeConfig, interaction_graph, quadrature, section_edges
from tl_degeneracy.engine.fit import LIBConfig, fit_basis
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.structures import autograd_only

SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid", "last"),
    Site("blocks.0.hook_resid_post"),
    Site("logits"),
)


@pytest.fixture
def linear_lib(api, tiny):
    model = tiny(api, "linear")
    sites = [Site(f"blocks.{i}.hook_resid_pre") for i in range(3)] + [Site("logits")]
    toks = torch.arange(model.cfg.d_vocab)[:, None]
    return model, toks, fit_basis(model, toks, LIBConfig(tuple(sites), progress=False))


def test_linear_single_position_column_sums_are_lambda(linear_lib):
    model, toks, lib = linear_lib
    graph = interaction_graph(model, toks, lib, progress=False)
    for sec in graph.sections.values():
        lam = lib[sec.section.inp].importance
        torch.testing.assert_close(sec.edges.sum(0), lam, rtol=1e-9, atol=1e-12 * float(lam[0]))
        assert (sec.edges >= 0).all()


def test_deep_linear_network_edges_are_diagonal(linear_lib):
    model, toks, lib = linear_lib
    graph = interaction_graph(model, toks, lib, progress=False)
    for sec in list(graph.sections.values())[:-1]:
        e = sec.edges
        off = e - torch.diag(torch.diagonal(e))
        assert off.abs().max() < 1e-10 * e.max()
        assert e.shape[0] == e.shape[1]


def test_edges_nonnegative_and_mean_node_apart(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 24)
    lib = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    graph = interaction_graph(model, toks, lib, progress=False)
    for sec in graph.sections.values():
        assert (sec.edges >= 0).all() and (sec.mean_edges >= 0).all()
        assert sec.edges.shape == (lib[sec.section.out].k, lib[sec.section.inp].k)
    data = graph.to_graph_data(top_n=3)
    assert len(data["layers"]) == 4 and data["edges"]


def test_stochastic_one_source_is_exact_for_one_output_position(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 16)
    lib = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    exact = section_edges(model, toks, lib[SITES[0]], lib[SITES[1]], progress=False)
    stoch = section_edges(
        model,
        toks,
        lib[SITES[0]],
        lib[SITES[1]],
        EdgeConfig(method="stochastic", n_sources=1),
        progress=False,
    )
    torch.testing.assert_close(stoch.edges, exact.edges, rtol=1e-10, atol=1e-14)


def test_stochastic_converges_over_positions(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 48)
    lib = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    b_in, b_out = lib[SITES[2]], lib[SITES[3]]  # all positions -> all positions
    exact = section_edges(model, toks, b_in, b_out, progress=False).edges
    errs = []
    for r in (1, 16, 128):
        est = section_edges(
            model,
            toks,
            b_in,
            b_out,
            EdgeConfig(method="stochastic", n_sources=r, chunk_size=128),
            batch_size=16,
            progress=False,
        ).edges
        errs.append(float(torch.linalg.norm(est - exact) / torch.linalg.norm(exact)))
    assert errs[2] < errs[1] < errs[0] and errs[2] < 0.2 * errs[0]


def test_integrated_gradients(api, tiny, tokens_for):
    model = tiny(api)
    toks = tokens_for(model, 12)
    lib = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    plain = section_edges(model, toks, lib[SITES[1]], lib[SITES[2]], progress=False)
    ig = section_edges(
        model, toks, lib[SITES[1]], lib[SITES[2]], EdgeConfig(integration_points=5), progress=False
    )
    assert ig.method == "exact-ig5" and not torch.allclose(ig.edges, plain.edges)
    points, weights = quadrature(5)
    assert abs(sum(weights) - 1) < 1e-12 and all(0 < p < 1 for p in points)


def test_integrated_gradients_on_linear_is_plain(linear_lib):
    model, toks, lib = linear_lib
    b = list(lib.bases.values())
    plain = section_edges(model, toks, b[0], b[1], progress=False)
    ig = section_edges(model, toks, b[0], b[1], EdgeConfig(integration_points=3), progress=False)
    torch.testing.assert_close(ig.edges, plain.edges, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pair", [(0, 1), (1, 2), (2, 3)])
def test_closed_form_edges_equal_autograd(api, tiny, tokens_for, pair):
    model = tiny(api)
    toks = tokens_for(model, 20)
    sites = (
        Site("blocks.0.hook_resid_pre"),
        Site("blocks.0.hook_resid_mid", [1, 3]),
        Site("blocks.0.hook_resid_post", [1, 3]),
        Site("logits", [1, 3]),
    )
    lib = fit_basis(model, toks, LIBConfig(sites, progress=False))
    b_in, b_out = lib[sites[pair[0]]], lib[sites[pair[1]]]
    fast = section_edges(model, toks, b_in, b_out, progress=False)
    with autograd_only():
        slow = section_edges(model, toks, b_in, b_out, progress=False)
    assert fast.method.startswith("closed_form") and slow.method == "exact"
    torch.testing.assert_close(
        fast.edges, slow.edges, rtol=1e-9, atol=1e-12 * float(slow.edges.max())
    )
    torch.testing.assert_close(fast.mean_edges, slow.mean_edges, rtol=1e-9, atol=1e-12)


def test_graph_html_is_offline_and_escaped(api, tiny, tokens_for, tmp_path):
    model = tiny(api)
    toks = tokens_for(model, 8)
    lib = fit_basis(model, toks, LIBConfig(SITES, progress=False))
    graph = interaction_graph(model, toks, lib, progress=False)
    page = graph.save_html(tmp_path / "graph.html").read_text()
    assert "tld-graph" in page and 'src="http' not in page
    assert page.count("d3") >= 1


REFERENCE_SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid", "last"),
    Site("blocks.0.hook_resid_post", "last"),
    Site("logits", "last"),
)
REFERENCE_NODES = ("ln1.0", "ln2.0", "unembed", "output")


def _reference_basis(ref, node: str, site: Site):
    """The reference's non-constant LIB columns in the centred convention (README)."""
    from tl_degeneracy.engine.bases import SiteBasis

    if node == "output":  # the logits, not rotated
        eye = torch.eye(114, dtype=torch.float64)
        zero = torch.zeros(114, dtype=torch.float64)
        return SiteBasis(site, "raw", eye, eye.clone(), zero + 1, zero, zero)
    c, c_pinv = ref[f"{node}/C"][:-1, 1:], ref[f"{node}/C_pinv"][1:, :-1]
    lam = ref[f"{node}/Lambda"][1 : c.shape[1] + 1]
    mean = ref[f"{node}/mean"][:-1]
    return SiteBasis(site, "lib", c, c_pinv, lam, mean, torch.zeros(128, dtype=torch.float64))


@pytest.mark.parametrize("section", [0, 1, 2])
def test_seed0_edges_match_reference(reference_dir, section):
    """Given the reference's bases on both sides, every edge between non-constant features
    above 1e-6 of the largest matches the reference's to relative error ≤ 1e-4."""
    from safetensors.torch import load_file

    from tl_degeneracy.models.modadd.checkpoints import ModAddCheckpoint

    ckpt = ModAddCheckpoint.open(reference_dir / "seed0")
    model = ckpt.model(dtype=torch.float64)
    train, _ = ckpt.dataset().train()
    ref = load_file(str(reference_dir / "seed0" / "lib_reference.safetensors"))
    a, b = REFERENCE_NODES[section], REFERENCE_NODES[section + 1]
    b_in = _reference_basis(ref, a, REFERENCE_SITES[section])
    b_out = _reference_basis(ref, b, REFERENCE_SITES[section + 1])
    ours = section_edges(model, train, b_in, b_out, batch_size=4096, progress=False)
    assert ours.method.startswith("closed_form")
    theirs = ref[f"edges/{a}->{b}"][:, 1:]
    if b != "output":
        theirs = theirs[1:]  # the constant output feature
    assert ours.edges.shape == theirs.shape
    big = theirs > 1e-6 * theirs.max()
    rel = ((ours.edges - theirs).abs()[big] / theirs[big]).max()
    assert rel <= 1e-4, f"{a}->{b}: worst relative error {rel:.2e}"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"method": "auto"}, "method must be 'exact' or 'stochastic', got 'auto'"),
        ({"n_sources": 0}, "n_sources must be a whole number of at least 1, got 0"),
        ({"integration_points": 0}, "integration_points must be a whole number of at least 1"),
        ({"chunk_size": -1}, "chunk_size must be a whole number of at least 1, got -1"),
        ({"stats_device": "gpu"}, "'gpu' is not a device"),
        ({"stats_device": "cuda:99"}, "device 'cuda:99'"),  # named before a fit, as LIBConfig
    ],
)
def test_a_setting_out_of_range_is_refused_when_made(setting, message):
    with pytest.raises(ValueError, match=message):
        EdgeConfig(**setting)


def test_the_graph_view_draws_the_reports_graph_data():
    """`InteractionGraph`'s own view is built as the study report's graph (`result_graph_data`)
    with the report's bounds: 16 features a site, and each feature's share counted over all
    its inputs, also the strong ones from features below the shown top few; −1: no module."""
    from tl_degeneracy.engine.bases import SiteBasis
    from tl_degeneracy.engine.basis_result import BasisResult
    from tl_degeneracy.engine.edges import InteractionGraph, SectionEdges
    from tl_degeneracy.engine.sections import Section
    from tl_degeneracy.viz.graph_data import result_graph_data
    from tl_degeneracy.viz.graph_widget import prepare_graph

    sites = [Site(f"blocks.{i}.hook_resid_pre") for i in range(3)]
    d, gen = 24, torch.Generator().manual_seed(0)
    eye = torch.eye(d, dtype=torch.float64)
    imp = torch.linspace(10, 1, d, dtype=torch.float64)
    zero = torch.zeros(d, dtype=torch.float64)
    basis = BasisResult({s.name: SiteBasis(s, "pca", eye, eye, imp, zero, imp) for s in sites}, {})
    sections = {}
    for a, b in zip(sites, sites[1:]):
        e = torch.rand(d, d, generator=gen, dtype=torch.float64)
        e[:, 20] = 50.0  # every output's strongest input is a feature below the top 16
        sec = SectionEdges(Section(a, b), e, zero.clone(), 8, "exact")
        sections[sec.section.name] = sec
    modules = {s.name: [-1] + [i % 3 for i in range(1, d)] for s in sites}
    graph = InteractionGraph(basis, sections, modules)
    data = graph.to_graph_data()
    assert data == result_graph_data(basis, sections, max_features=16, modules=modules)
    assert [len(la["features"]) for la in data["layers"]] == [16, 16, 16]
    assert data["layers"][0]["features"][0]["module"] is None
    drawn = prepare_graph(data)
    first = [e for e in drawn["edges"] if e["target"] == f"{sites[1].name}:0"]
    assert first[0]["cum"] > 0.5  # the listed inputs come after feature 20's share
    assert 'data-features="48"' in graph._repr_html_()
