import math

import torch

from tl_degeneracy.engine.modularity import find_modules, interaction_network


def planted(n_blocks=3, size=4, n_layers=3, noise=1e-6, seed=0):
    """Edges between consecutive layers that only connect features of the same block."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.arange(n_blocks * size) // size
    same = (block[:, None] == block[None, :]).double()
    sections = {}
    for layer in range(n_layers - 1):
        strong = torch.rand(n_blocks * size, n_blocks * size, generator=gen, dtype=torch.float64)
        e = same * (0.5 + strong) + noise * torch.rand(
            same.shape, generator=gen, dtype=torch.float64
        )
        sections[(f"site{layer}", f"site{layer + 1}")] = e
    return sections, block


def test_planted_blocks_are_recovered_exactly():
    sections, block = planted()
    modules = find_modules(sections)
    assert modules.n_modules == 3
    labels = modules.by_site()
    for lab in labels.values():
        lab = torch.tensor(lab)
        # same block <=> same module, at every site and across sites
        assert torch.equal(lab[:, None] == lab[None, :], block[:, None] == block[None, :])
    first = torch.tensor(labels["site0"])
    for lab in labels.values():
        assert torch.equal(torch.tensor(lab), first)
    assert 0.6 < modules.modularity_q <= 1


def test_weights_are_log_ratio_clipped():
    e = torch.tensor([[1.0, 1e-2], [1e-5, 0.0]], dtype=torch.float64)
    g = interaction_network({("a", "b"): e}, relative_epsilon=1e-3)
    assert abs(g[("a", 0)][("b", 0)]["weight"] - math.log(1e3)) < 1e-12
    assert abs(g[("a", 1)][("b", 0)]["weight"] - math.log(10.0)) < 1e-12
    assert not g.has_edge(("a", 0), ("b", 1))  # below ε: weight 0, no edge


def test_unstructured_graph_has_low_q():
    gen = torch.Generator().manual_seed(1)
    sections = {("a", "b"): torch.rand(12, 12, generator=gen, dtype=torch.float64) + 0.5}
    assert find_modules(sections).modularity_q < 0.1
