"""Module finding: edge weights, which features take part, the algorithms, and recovery of planted
block-diagonal networks (exact) with the default and the reference's setting."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch

from tl_degeneracy.engine import module_finding
from tl_degeneracy.engine.degeneracy.invariance import planted_sections
from tl_degeneracy.engine.modularity import (
    REFERENCE_MODULES,
    ModuleConfig,
    edge_weights,
    find_modules,
    interaction_network,
    select_features,
)
from tl_degeneracy.engine.module_finding import (
    UNASSIGNED,
    Modules,
    adjusted_rand_index,
    leiden_available,
    newman_q,
    partition,
    same_partition,
    with_singletons,
)


def block_truth(modules: Modules, block: torch.Tensor) -> dict:
    return {(s, i): int(block[i]) for (s, i) in modules.assignment}


@pytest.mark.parametrize(
    "config",
    [ModuleConfig(), ModuleConfig(include_final=True, top_k=None), REFERENCE_MODULES],
    ids=["default", "default, every feature", "reference"],
)
def test_planted_blocks_are_recovered_exactly(config):
    sections, block = planted_sections()
    modules = find_modules(sections, config)
    assert modules.n_modules == 3
    assert same_partition(modules.assignment, block_truth(modules, block))
    assert 0.6 < modules.modularity_q <= 1
    inside = [modules.internal_mass[m] / modules.touching_mass[m] for m in range(3)]
    assert min(inside) > 1 - 1e-4  # cross-block leakage is 1e-6


def test_default_recovers_blocks_whose_importance_halves_per_feature():
    """Features 2x less important each (edges over 7 decades) and cross-block leakage of 1%,
    four sites: the default recovers the blocks, the reference's setting (log weights, ε = 1e-3
    × largest edge) breaks them into many pieces, linear weights split them along depth."""
    sections, block = planted_sections(n_sites=4, decay=0.5, noise=1e-2)
    default = find_modules(sections, include_final=True, top_k=None)
    assert same_partition(default.assignment, block_truth(default, block))
    reference = find_modules(sections, REFERENCE_MODULES)
    assert reference.n_modules > 3
    assert adjusted_rand_index(reference.assignment, block_truth(reference, block)) < 0.9
    linear = find_modules(sections, weighting="linear", include_final=True, top_k=None)
    assert not same_partition(linear.assignment, block_truth(linear, block))


def test_default_leaves_out_the_final_site_and_marks_it():
    sections, _ = planted_sections(n_sites=3)
    modules = find_modules(sections)
    assert {s for s, _ in modules.assignment} == {"site0", "site1"}
    labels = modules.by_site()
    assert labels["site2"] == [UNASSIGNED] * 12
    assert all(m >= 0 for m in labels["site0"] + labels["site1"])
    # a single section has no site to leave out
    one = find_modules({("a", "b"): sections[("site0", "site1")]})
    assert {s for s, _ in one.assignment} == {"a", "b"}


def test_weights():
    e = torch.tensor([[1.0, 1e-2], [1e-5, 0.0]], dtype=torch.float64)
    log = edge_weights(e, REFERENCE_MODULES)
    assert log[0, 0] == pytest.approx(math.log(1e3)) and log[0, 1] == pytest.approx(math.log(10))
    assert log[1, 0] == 0 and log[1, 1] == 0  # below ε: no edge
    assert torch.equal(edge_weights(e, ModuleConfig("linear", "none")), e)
    assert torch.allclose(edge_weights(e, ModuleConfig("sqrt", "none")), e.sqrt())
    inputs = edge_weights(e, ModuleConfig())  # √E, each row scaled to sum 1
    assert torch.allclose(inputs, e.sqrt() / e.sqrt().sum(1, keepdim=True))
    sym = edge_weights(e, ModuleConfig("linear", "symmetric"))
    rows, cols = e.sum(1, keepdim=True), e.sum(0, keepdim=True)
    assert torch.allclose(sym, e / (rows * cols).sqrt())
    # round-off is not an interaction: per-node normalisation must not blow it up
    noise = torch.tensor([[1.0, 0.0], [0.0, 1e-17]], dtype=torch.float64)
    assert edge_weights(noise, ModuleConfig())[1].sum() == 0
    with pytest.raises(ValueError, match="non-negative"):
        edge_weights(-e, ModuleConfig())


def test_network_weights_are_the_log_ratio_clipped():
    e = torch.tensor([[1.0, 1e-2], [1e-5, 0.0]], dtype=torch.float64)
    g = interaction_network({("a", "b"): e}, REFERENCE_MODULES)
    assert g[("a", 0)][("b", 0)]["weight"] == pytest.approx(math.log(1e3))
    assert g[("a", 1)][("b", 0)]["weight"] == pytest.approx(math.log(10.0))
    assert not g.has_edge(("a", 0), ("b", 1))
    assert g[("a", 1)][("b", 0)]["E"] == 1e-2


def test_feature_selection():
    gen = torch.Generator().manual_seed(0)
    sections = {
        ("a", "b"): torch.rand(5, 6, generator=gen, dtype=torch.float64),
        ("b", "c"): torch.rand(4, 5, generator=gen, dtype=torch.float64),
    }
    chosen = select_features(sections, ModuleConfig(top_k=3, include_final=True))
    assert {s: v.tolist() for s, v in chosen.items()} == {
        "a": [0, 1, 2],
        "b": [0, 1, 2],
        "c": [0, 1, 2],
    }
    importance = {"a": torch.tensor([0.0, 5, 1, 4, 3, 2])}
    chosen = select_features(sections, ModuleConfig(top_k=2), importance)
    assert chosen["a"].tolist() == [1, 3] and "c" not in chosen
    # edges into only the first outputs (as for edges into the top outputs): importance of a
    # longer basis is cut to the features the edges cover
    long = {"c": torch.arange(10.0)}
    assert select_features(sections, ModuleConfig(top_k=2, include_final=True), long)[
        "c"
    ].tolist() == [2, 3]
    per_site = select_features(sections, ModuleConfig(top_k={"a": 1}, include_final=True))
    assert [len(per_site[s]) for s in "abc"] == [1, 5, 4]
    # the fewest features carrying a share of each site's edge mass
    e = torch.zeros(3, 4, dtype=torch.float64)
    e[0, 0], e[1, 1], e[2, 2] = 10.0, 1.0, 0.01
    for share, kept in ((0.9, [0]), (0.99, [0, 1]), (0.9995, [0, 1, 2])):  # 10, 11, 11.01 of 11.01
        chosen = select_features({("a", "b"): e}, ModuleConfig(top_k=None, edge_share=share))
        assert chosen["a"].tolist() == kept and chosen["b"].tolist() == kept
    with pytest.raises(ValueError, match="not both"):
        ModuleConfig(edge_share=0.9)


def test_unstructured_graph_has_low_q():
    gen = torch.Generator().manual_seed(1)
    sections = {("a", "b"): torch.rand(12, 12, generator=gen, dtype=torch.float64) + 0.5}
    assert find_modules(sections, normalise="none").modularity_q < 0.1


def test_modules_are_numbered_by_edge_mass_and_described():
    sections, block = planted_sections(n_blocks=2, size=3, decay=0.6)
    modules = find_modules(sections, include_final=True, top_k=None)
    inside = [modules.internal_mass[m] for m in range(modules.n_modules)]
    assert inside == sorted(inside, reverse=True)
    total = sum(float(e.sum()) for e in sections.values())
    assert modules.total_mass == pytest.approx(total)
    described = modules.describe(labels=lambda node: f"block {int(block[node[1]])}")
    assert sum(d.edge_share for d in described) == pytest.approx(1.0, abs=1e-3)
    for d in described:
        assert len(set(d.labels)) == 1  # one block per module
        assert d.internal_fraction > 0.99
    assert described[0].features[0] == ("site0", 0)  # feature 0 (the largest) is in module 0
    by_mapping = modules.describe(labels={("site0", 0): "x"})
    assert by_mapping[0].labels[0] == "x" and by_mapping[0].labels[1] == ""
    rows = modules.summary_rows(labels=lambda n: "<b>")
    assert rows and "site0:0 (<b>)" in rows[0]["members"]
    page = modules.to_html(labels=lambda n: "<b>")
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "Q = " in modules._repr_html_()


def test_modules_save_and_load(tmp_path):
    sections, _ = planted_sections()
    modules = find_modules(sections)
    loaded = Modules.load(modules.save(tmp_path / "modules.json"))
    assert loaded.assignment == modules.assignment
    assert loaded.by_site() == modules.by_site()
    assert loaded.modularity_q == modules.modularity_q
    assert loaded.describe()[0].edge_share == modules.describe()[0].edge_share


def test_more_seeds_never_lower_q():
    gen = torch.Generator().manual_seed(3)
    sections = {("a", "b"): torch.rand(20, 20, generator=gen, dtype=torch.float64) ** 4}
    one = find_modules(sections, normalise="none", n_seeds=1)
    five = find_modules(sections, normalise="none", n_seeds=5)
    assert five.modularity_q >= one.modularity_q - 1e-12


def test_partition_covers_every_node_and_q_matches_networkx():
    g = nx.Graph()
    g.add_weighted_edges_from([(("a", 0), ("b", 0), 1.0), (("a", 1), ("b", 1), 2.0)])
    g.add_node(("a", 2))  # isolated
    found = partition(g)
    assert sorted(n for c in found for n in c) == sorted(g.nodes)
    assert newman_q(g, found) == pytest.approx(nx.community.modularity(g, found, weight="weight"))
    assert newman_q(nx.empty_graph([("a", 0)]), [{("a", 0)}]) == 0.0


@pytest.mark.skipif(not leiden_available(), reason="leidenalg/igraph not installed (modules extra)")
def test_leiden_recovers_planted_blocks():
    sections, block = planted_sections()
    modules = find_modules(sections, algorithm="leiden")
    assert same_partition(modules.assignment, block_truth(modules, block))


def test_leiden_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(module_finding, "leiden_available", lambda: False)
    sections, _ = planted_sections()
    with pytest.raises(ImportError, match="modules"):
        find_modules(sections, algorithm="leiden")


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="weighting"):
        ModuleConfig(weighting="cube")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="algorithm"):
        ModuleConfig(algorithm="spectral")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no sections"):
        find_modules({})
    for bad in (-1, 0, 2.5):  # top_k=-1 used to leave out every site's last feature silently
        with pytest.raises(ValueError, match="top_k must be a positive"):
            ModuleConfig(top_k=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k must be a positive"):
        ModuleConfig(top_k={"a": 0})
    with pytest.raises(ValueError, match="n_seeds must be"):
        ModuleConfig(n_seeds=0)


def test_plain_edges_are_checked_and_converted():
    """A site's size must agree between the sections it is in: a 5-feature output feeding a
    3-feature input used to lose two features silently (or fail with a bare IndexError).
    NumPy arrays are taken as tensors (they used to fail on `.detach`)."""
    with pytest.raises(ValueError, match=r"site 'b' has 5 features as the output .* but 3 as"):
        find_modules({("a", "b"): torch.rand(5, 3), ("b", "c"): torch.rand(4, 3)})
    with pytest.raises(ValueError, match="must be a matrix"):
        find_modules({("a", "b"): torch.rand(5)})
    with pytest.raises(ValueError, match="non-negative"):
        find_modules({("a", "b"): -torch.rand(3, 3)})
    with pytest.raises(ValueError, match="keyed by"):
        find_modules({"a->b": torch.rand(3, 3)})
    sections, block = planted_sections()
    as_numpy = {key: e.numpy() for key, e in sections.items()}
    assert find_modules(as_numpy).assignment == find_modules(sections).assignment


def test_singletons_for_features_that_took_no_part():
    out = with_singletons({("a", 0): 0, ("a", 1): UNASSIGNED}, [("a", 0), ("a", 1), ("a", 2)])
    assert out[("a", 0)] == 0 and len(set(out.values())) == 3
