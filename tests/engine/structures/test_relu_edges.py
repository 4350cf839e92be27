"""The grouped evaluation of a ReLU form's edges (`relu_edges`) against every example's
Jacobian formed from all of its hidden units, whatever the grouping."""

import pytest
import torch

from tl_degeneracy.engine.structures import relu_edges
from tl_degeneracy.engine.structures.relu_edges import mask_centres, relu_edge_sums


def _problem(n: int, d_hidden: int, masks: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k_in, k_out = 7, 5

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    feats, lin, proj, read = (
        randn(n, k_in),
        randn(k_in, k_out),
        randn(k_in, d_hidden),
        randn(d_hidden, k_out),
    )
    if masks == "clustered":  # a few prototypes with a few flipped units each
        protos = torch.rand(4, d_hidden, generator=gen) < 0.5
        pick = torch.randint(0, 4, (n,), generator=gen)
        flip = torch.rand(n, d_hidden, generator=gen) < 0.1
        m = protos[pick] ^ flip
    elif masks == "random":
        m = torch.rand(n, d_hidden, generator=gen) < 0.5
    elif masks == "equal":
        m = (torch.rand(1, d_hidden, generator=gen) < 0.5).expand(n, d_hidden)
    else:
        m = torch.zeros(n, d_hidden, dtype=torch.bool)
    return feats, m.to(torch.float64), lin, proj, read


def _brute_force(feats, masks, lin, proj, read):
    jac = lin + torch.einsum("jm,nm,mi->nji", proj, masks, read)
    return (feats[:, :, None] * jac).pow(2).sum(0)


@pytest.mark.parametrize("masks", ["clustered", "random", "equal", "off"])
@pytest.mark.parametrize("n_centres", [None, 1, 3, 40])
def test_equals_per_example_jacobians(masks, n_centres):
    problem = _problem(40, 24, masks)
    got = relu_edge_sums(*problem, n_centres=n_centres)
    torch.testing.assert_close(got, _brute_force(*problem), rtol=1e-12, atol=1e-12)


def test_rows_in_chunks(monkeypatch):
    problem = _problem(40, 24, "clustered", seed=4)
    monkeypatch.setattr(relu_edges, "ROWS", 7)
    torch.testing.assert_close(
        relu_edge_sums(*problem), _brute_force(*problem), rtol=1e-12, atol=1e-12
    )


def test_one_example_and_wide_layer():
    for problem in (_problem(1, 9, "random", seed=1), _problem(50, 300, "clustered", seed=2)):
        torch.testing.assert_close(
            relu_edge_sums(*problem), _brute_force(*problem), rtol=1e-12, atol=1e-10
        )


def test_centres_are_nearest_and_distances_exact():
    _, masks, *_ = _problem(60, 32, "clustered", seed=3)
    centres, group, distance = mask_centres(masks, 5)
    hamming = (masks[:, None] != centres[None]).sum(-1)  # [n, k]
    assert torch.equal(distance, hamming[torch.arange(60), group])
    assert torch.equal(distance, hamming.min(1).values)
    assert set(centres.unique().tolist()) <= {0.0, 1.0}
    # majority votes move the centres closer than the starting examples were
    start, _, start_distance = mask_centres(masks, 5, iterations=0)
    assert distance.sum() <= start_distance.sum()
